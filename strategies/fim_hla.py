"""FIM-HLA: Fed-HeLLo's layer allocation from the Fisher information of the global adapter.

Zhang et al., "Fed-HeLLo: Efficient Federated Foundation Model Fine-Tuning with Heterogeneous
LoRA Allocation", arXiv 2506.12213. See docs/methods/fim-hla.md and strategies/layer_base.py.

In rounds ``first-round``, ``first-round + period``, ... (default 50, 100, ... [code]) the
server loads the current global adapter and computes on the first ``examples`` (default 100)
examples of its server split the empirical diagonal Fisher of the LoRA parameters [code]

    F_theta = (1 / N) sum_i (d z_{y_i}(x_i) / d theta)^2,    z_y the logit of the true label,

averaged over examples (the authors divided by the number of batches: not copied). Layer l's
score is s_l = sum over its LoRA parameters of ||F_theta||_F; a 1-D k-means (k = 3) of the scores
gives three clusters, sorted by centroid, with probabilities 1/27, 2/27, 1/9 from low to high
[code; sorting: choice], normalised over the layers. Each client then draws K_c layers as in
RGD-HLA. Other rounds reuse the last probabilities [choice]; before the first computation the
``initial-pattern`` (default Bottleneck, the code's fallback) is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from hetfed import adapter_state, wire
from hetfed.adapter_state import State
from hetfed.errors import ConfigError
from hetfed.layer_allocation import PATTERNS, fisher_layer_scores, fisher_probabilities
from hetfed.models import CLASSIFICATION
from strategies.layer_base import LayerOptions, LayerStrategy


@dataclass(frozen=True)
class FIMHLAOptions(LayerOptions):
    """Options under ``fim-hla.``: the shared ones plus the Fisher schedule and split size."""

    prefix: ClassVar[str] = "fim-hla"

    period: int = 50
    first_round: int = 50
    examples: int = 100
    initial_pattern: str = "bottleneck"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("period", "first_round", "examples"):
            if getattr(self, name) < 1:
                raise ConfigError(self.key(name), getattr(self, name), "an integer >= 1")
        if self.initial_pattern not in PATTERNS:
            raise ConfigError(
                self.key("initial_pattern"), self.initial_pattern, " | ".join(PATTERNS)
            )


class FIMHLA(LayerStrategy):
    """FIM-HLA (Fed-HeLLo): layers drawn with probabilities from the global adapter's Fisher."""

    name = "fim-hla"
    description = "Fed-HeLLo FIM-HLA: layers drawn by Fisher-information clusters of the layers"
    options_class = FIMHLAOptions
    tasks = (CLASSIFICATION,)  # its server-side loss is over class logits

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # p used by the draws: the initial pattern until the first Fisher computation.
        self.layer_probabilities = self.pattern_probabilities(self.options.initial_pattern)
        self.layer_scores: np.ndarray | None = None  # s_l of the last computation
        self.fisher_rounds: list[int] = []  # the rounds that recomputed p

    def server_examples_needed(self) -> int:
        return self.options.examples  # the Fisher information is computed on that many

    def fisher_due(self, server_round: int) -> bool:
        """Whether p is recomputed before ``server_round``: first-round, +period, ..."""
        first, period = self.options.first_round, self.options.period
        return server_round >= first and (server_round - first) % period == 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Recompute p from the round's global adapter when due, then distribute as usual."""
        recomputed = self.fisher_rounds[-1:] == [server_round]  # a retried round reuses p
        if self.num_layers is not None and self.fisher_due(server_round) and not recomputed:
            self.update_probabilities(server_round, wire.from_record(arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def update_probabilities(self, server_round: int, global_state: State) -> np.ndarray:
        """Layer scores of ``global_state`` on the server split, and p from their clusters."""
        if self.server is None:
            raise RuntimeError("fim-hla computes the Fisher on the server: bind a ServerModel")
        spec, count = self.global_spec(), self.options.examples
        public = self.server.public
        with self.server.host.lock:
            model = self.server.load(*self.model_view(global_state))
            parameters = {
                name: parameter
                for name, parameter in model.named_parameters()
                if f".{spec.name}." in name and "lora_" in name
            }
            scores = fisher_layer_scores(
                model,
                public.input_ids[:count],
                public.attention_mask[:count],
                public.labels[:count],
                parameters,
                adapter_state.layer_of,
                self.num_layers,
                batch_size=self.settings.train.eval_batch_size,
            )
        self.layer_scores = scores
        self.layer_probabilities = fisher_probabilities(scores)
        self.fisher_rounds.append(server_round)
        log(
            INFO,
            "fim-hla: round %d Fisher layer scores %s -> layer probabilities %s",
            server_round,
            np.array2string(scores, precision=4),
            np.array2string(self.layer_probabilities, precision=4),
        )
        return self.layer_probabilities

    def allocate(self, server_round: int, client_id: int, budget: int) -> list[int]:
        return self.sample(server_round, client_id, budget, self.layer_probabilities)

    def state_dict(self) -> dict[str, Any]:
        def as_list(values: np.ndarray | None) -> list[float] | None:
            return None if values is None else values.tolist()

        return {
            **super().state_dict(),
            "layer_probabilities": as_list(self.layer_probabilities),
            "layer_scores": as_list(self.layer_scores),
            "fisher_rounds": list(self.fisher_rounds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def as_array(values: list[float] | None) -> np.ndarray | None:
            return None if values is None else np.asarray(values, dtype=np.float64)

        super().load_state_dict(state)
        self.layer_probabilities = as_array(state["layer_probabilities"])
        self.layer_scores = as_array(state["layer_scores"])
        self.fisher_rounds = list(state["fisher_rounds"])
