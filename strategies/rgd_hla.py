"""RGD-HLA: Fed-HeLLo's randomised geometric layer allocation.

Zhang et al., "Fed-HeLLo: Efficient Federated Foundation Model Fine-Tuning with Heterogeneous
LoRA Allocation", arXiv 2506.12213. See docs/methods/rgd-hla.md and strategies/layer_base.py.

Every round each client c draws K_c distinct layers without replacement with the probabilities
p of a geometric pattern (``uniform``, ``triangle``, ``inverted-triangle``, ``bottleneck``, as
in GD-HLA) [code]: ``rng.choice(L, K_c, replace=False, p=p)``, numpy's successive draws. The
generator is seeded with (seed, round, client id), so a run is reproducible. Aggregation: per
layer over the clients that trained it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from strategies.layer_base import LayerStrategy, PatternOptions


@dataclass(frozen=True)
class RGDHLAOptions(PatternOptions):
    """Options under ``rgd-hla.``: pattern, weighting, ranks, rank, full-budget-only."""

    prefix: ClassVar[str] = "rgd-hla"


class RGDHLA(LayerStrategy):
    """RGD-HLA (Fed-HeLLo): every round, K_c layers drawn with a pattern's probabilities."""

    name = "rgd-hla"
    description = "Fed-HeLLo RGD-HLA: each round K_c layers drawn with a layer pattern's weights"
    options_class = RGDHLAOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probabilities = self.pattern_probabilities(self.options.pattern)

    def allocate(self, server_round: int, client_id: int, budget: int) -> list[int]:
        return self.sample(server_round, client_id, budget, self.probabilities)
