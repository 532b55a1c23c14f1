"""Layer heterogeneity (Fed-HeLLo): the shared base of GD-HLA, RGD-HLA and FIM-HLA.

Zhang et al., "Fed-HeLLo: Efficient Federated Foundation Model Fine-Tuning with Heterogeneous
LoRA Allocation", arXiv 2506.12213. See docs/methods/gd-hla.md, rgd-hla.md, fim-hla.md.

Client c has a layer budget K_c (its tier's ``layers``, see :mod:`hetfed.profiles`) and trains
the LoRA modules of K_c of the model's L transformer blocks; the others stay frozen at the values
it received and are not sent back. A subclass only decides *which* layers (:meth:`allocate`):

- GD-HLA: a fixed allocation whose per-layer client counts follow a geometric pattern p;
- RGD-HLA: every round K_c distinct layers drawn without replacement with probabilities p;
- FIM-HLA: as RGD-HLA with p from the Fisher information of the global adapter.

Aggregation [code], per LoRA tensor of layer l over the set C_l of clients that trained it:

    W_l <- W_l + sum_{c in C_l} w_c (W_c - W_l) = sum_{c in C_l} w_c W_c,
    w_c = 1 / |C_l| (``weighting = "uniform"``, the code) or n_c / sum_{j in C_l} n_j
    (``"examples"``); a layer nobody trained stays unchanged (bit for bit).

The base class :class:`~strategies.base.LoRAStrategy` already groups the modules by their set
of contributors and keeps untrained modules; :meth:`LayerStrategy.aggregate_lora` only weights.
The task head is averaged with the data weights p_k over all repliers (every hetfed method; the
authors' code never aggregated its head).

Ranks (``ranks``), a rank policy (:mod:`hetfed.rank_policies`): ``"uniform"`` is Fed-HeLLo's
setting, every client at one rank r (the ``rank`` option, 0 = the smallest tier rank), weighted
as ``weighting`` says. ``"hetlora"`` is hetfed's combination with HetLoRA's rank heterogeneity
(in no paper): tier ranks by truncation, local rank self-pruning and, per layer, HetLoRA's
sparsity-weighted sum of the zero-padded factors of the clients that trained that layer,
S_c = ||B_c A_c||_F over the layer's modules (HetLoRA's default options).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from hetfed import seeds, wire
from hetfed.adapter_state import LoraPairs, layer_of
from hetfed.aggregation import padded_weighted_sum
from hetfed.config import config_key
from hetfed.errors import ConfigError
from hetfed.layer_allocation import PATTERNS, pattern_probabilities, sample_layers
from hetfed.rank_policies import (
    DATA_WEIGHTINGS,
    DEFAULT_PRUNING,
    SelfPruning,
    TierRanks,
    UniformRank,
)
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate

RANK_MODES = ("uniform", "hetlora")


@dataclass(frozen=True)
class LayerOptions:
    """Options every Fed-HeLLo strategy shares; keys ``<strategy>.<field-with-dashes>``.

    - ``weighting``: ``"uniform"`` (plain mean over the clients that trained the layer, [code])
      or ``"examples"`` (weighted by n_c);
    - ``ranks``: ``"uniform"`` (Fed-HeLLo: one rank for all) or ``"hetlora"`` (hetfed's
      combination with HetLoRA; then ``weighting`` and ``rank`` keep their defaults);
    - ``rank``: the one rank of ``ranks = "uniform"``; 0 = the smallest tier rank;
    - ``full_budget_only``: the baseline that trains only the clients whose budget covers all
      layers (the others are not sampled into training).
    """

    prefix: ClassVar[str] = ""

    weighting: str = "uniform"
    ranks: str = "uniform"
    rank: int = 0
    full_budget_only: bool = False

    def key(self, field_name: str) -> str:
        return config_key(self.prefix, field_name)

    def __post_init__(self) -> None:
        if self.weighting not in DATA_WEIGHTINGS:
            raise ConfigError(self.key("weighting"), self.weighting, " | ".join(DATA_WEIGHTINGS))
        if self.ranks not in RANK_MODES:
            raise ConfigError(self.key("ranks"), self.ranks, " | ".join(RANK_MODES))
        if self.rank < 0:
            raise ConfigError(
                self.key("rank"), self.rank, "0 (smallest tier rank) or an integer >= 1"
            )
        if self.ranks == "hetlora" and self.rank != 0:
            raise ConfigError(
                self.key("rank"), self.rank, "0: with ranks = 'hetlora' every tier uses its rank"
            )
        if self.ranks == "hetlora" and self.weighting != "uniform":
            raise ConfigError(
                self.key("weighting"),
                self.weighting,
                "'uniform' (unused): with ranks = 'hetlora' HetLoRA's sparsity weights apply",
            )


@dataclass(frozen=True)
class PatternOptions(LayerOptions):
    """Plus ``pattern``: the GD-HLA geometric pattern of per-layer probabilities."""

    pattern: str = "bottleneck"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern not in PATTERNS:
            raise ConfigError(self.key("pattern"), self.pattern, " | ".join(PATTERNS))


class LayerStrategy(LoRAStrategy):
    """Fed-HeLLo's layer-heterogeneous LoRA; subclasses choose the layers (:meth:`allocate`)."""

    options_class: ClassVar[type] = LayerOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._round_clients: list[int] = []  # the clients that train in the current round

    def make_rank_policy(self) -> TierRanks:
        if self.options.ranks == "hetlora":
            return SelfPruning(self.profiles.max_rank, DEFAULT_PRUNING, "sparsity")
        return UniformRank(self.options.rank or self.profiles.min_rank, self.options.weighting)

    # ------------------------------------------------------------------ layers
    def layer_budget(self, client_id: int) -> int | None:
        """K_c of a client, or None when it trains every layer (or the model's L is unknown)."""
        layers = self.budgets[client_id].layers
        if self.num_layers is None or layers is None or layers >= self.num_layers:
            return None
        return layers

    def participates(self, client_id: int) -> bool:
        """Every client, or only full-budget ones (``full_budget_only``); records the round's."""
        if self.options.full_budget_only and self.layer_budget(client_id) is not None:
            return False
        self._round_clients.append(client_id)
        return True

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # The base calls participates() for every sampled client before any client_layers():
        # this round's client list is complete when the first allocation is made.
        self._round_clients = []
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.num_layers is not None and messages:
            counts = np.zeros(self.num_layers, dtype=int)
            for msg in messages:
                sent = msg.content[wire.CONFIG]
                counts[list(sent[wire.LAYERS]) if wire.LAYERS in sent else slice(None)] += 1
            log(INFO, "%s: round %d clients per layer %s", self.name, server_round, counts.tolist())
        return messages

    def round_clients(self) -> list[int]:
        """The sorted clients training this round (all known clients outside configure_train)."""
        return sorted(set(self._round_clients) or self.budgets)

    def client_layers(self, server_round: int, client_id: int) -> list[int] | None:
        budget = self.layer_budget(client_id)
        if budget is None:
            return None
        return self.allocate(server_round, client_id, budget)

    @abstractmethod
    def allocate(self, server_round: int, client_id: int, budget: int) -> list[int]:
        """The ``budget`` (< L) distinct layers client ``client_id`` trains in ``server_round``."""

    def sample(
        self, server_round: int, client_id: int, budget: int, probabilities: np.ndarray
    ) -> list[int]:
        """RGD-HLA's draw, reproducible: a generator seeded by (seed, round, client id)."""
        rng = seeds.layer_rng(self.settings.seed, server_round, client_id)
        return sample_layers(rng, budget, probabilities)

    def pattern_probabilities(self, pattern: str) -> np.ndarray | None:
        """p of a GD-HLA pattern over the model's layers (None while L is unknown)."""
        return None if self.num_layers is None else pattern_probabilities(pattern, self.num_layers)

    # ------------------------------------------------------------------ ranks
    def state_dict(self) -> dict[str, Any]:
        return {"hetlora": super().state_dict()} if self.options.ranks == "hetlora" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.options.ranks == "hetlora":
            super().load_state_dict(state["hetlora"])

    # ------------------------------------------------------------------ aggregation
    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        """The modules of ``global_lora`` were trained by exactly the clients of ``updates``;
        each layer's modules are summed with the rank policy's weights over that layer (one
        rank: 1/|C_l| or n_c weights; HetLoRA ranks: S_c over the layer's modules)."""
        by_layer: dict[int | None, list[str]] = {}
        for module in global_lora:
            by_layer.setdefault(layer_of(module), []).append(module)
        aggregated: LoraPairs = {}
        for modules in by_layer.values():
            layer = [u.restricted(modules) for u in updates]
            weights = self.policy_weights(layer)
            replies = [u.lora for u in layer]
            aggregated |= padded_weighted_sum(replies, modules, self.global_rank(), weights)
        return aggregated
