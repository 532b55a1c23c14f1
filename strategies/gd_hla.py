"""GD-HLA: Fed-HeLLo's geometric layer allocation, deterministic.

Zhang et al., "Fed-HeLLo: Efficient Federated Foundation Model Fine-Tuning with Heterogeneous
LoRA Allocation", arXiv 2506.12213. See docs/methods/gd-hla.md and strategies/layer_base.py.

A geometric pattern fixes p_l, the share of clients that train layer l [paper]: ``uniform``,
``triangle`` p_l ∝ (L - l), ``inverted-triangle`` p_l ∝ (l + 1), ``bottleneck`` (the authors'
12-layer profile 1/9, 1/9, 1/9, 2/27, 2/27, 1/27, 1/27, 1/27, 2/27, 1/9, 1/9, 1/9 [code],
resampled for other L). The round's clients (sorted by client id) with budgets K_c get K_c distinct
layers each so that the count of clients on layer l follows t_l = p_l * sum_c K_c as closely as
the budgets allow (:func:`hetfed.layer_allocation.deterministic_allocation`); the same clients get
the same allocation every round. Aggregation: per layer over the clients that trained it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hetfed.layer_allocation import deterministic_allocation
from strategies.layer_base import LayerStrategy, PatternOptions


@dataclass(frozen=True)
class GDHLAOptions(PatternOptions):
    """Options under ``gd-hla.``: pattern, weighting, ranks, rank, full-budget-only."""

    prefix: ClassVar[str] = "gd-hla"


class GDHLA(LayerStrategy):
    """GD-HLA (Fed-HeLLo): a fixed layer allocation whose per-layer counts follow a pattern."""

    name = "gd-hla"
    description = "Fed-HeLLo GD-HLA: fixed per-client layers whose counts follow a layer pattern"
    options_class = GDHLAOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probabilities = self.pattern_probabilities(self.options.pattern)
        self._allocation: dict[int, list[int]] = {}
        self._allocated_for: tuple[int, ...] = ()

    def allocate(self, server_round: int, client_id: int, budget: int) -> list[int]:
        clients = tuple(self.round_clients())
        if client_id not in clients:  # asked outside the round: allocate over every known client
            clients = tuple(sorted(self.budgets))
        if clients != self._allocated_for:
            budgets = [self.layer_budget(n) or self.num_layers for n in clients]
            allocation = deterministic_allocation(budgets, self.probabilities)
            self._allocation = dict(zip(clients, allocation, strict=True))
            self._allocated_for = clients
        return self._allocation[client_id]
