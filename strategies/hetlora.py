"""HetLoRA: heterogeneous ranks by truncation, local rank self-pruning, sparsity-weighted sums.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024 (arXiv 2401.06432). See docs/methods/hetlora.md.

- Distribute: client k gets B[:, :r_k], A[:r_k, :] of the rank-r_max global modules.
- Train locally with f_k + lambda * ||B[:, q:]||_F ||A[q:, :]||_F, q = floor(gamma r_k); if that
  tail score decreased during the round the client prunes to max(r_min, q) and keeps the rank.
- Aggregate: zero-pad every reply to r_max and sum with weights S_k / sum S, S_k = ||B_k A_k||_F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hetfed import lora_algebra as la
from hetfed import wire
from hetfed.errors import ConfigError
from hetfed.wire import LoraPairs
from strategies.base import ClientUpdate, LoRAStrategy
from strategies.zeropad import pad_and_sum

WEIGHTINGS = ("sparsity", "sparsity-per-module", "uniform")


@dataclass(frozen=True)
class HetLoRAOptions:
    """Options under ``hetlora.``; defaults from a public reimplementation (methods.md)."""

    prune: bool = True
    prune_gamma: float = 0.99
    prune_lambda: float = 0.01
    min_rank: int = 1
    weighting: str = "sparsity"

    def __post_init__(self) -> None:
        if not 0 < self.prune_gamma < 1:
            raise ConfigError("hetlora.prune-gamma", self.prune_gamma, "a number in (0, 1)")
        if self.prune_lambda < 0:
            raise ConfigError("hetlora.prune-lambda", self.prune_lambda, "a number >= 0")
        if self.min_rank < 1:
            raise ConfigError("hetlora.min-rank", self.min_rank, "an integer >= 1")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(
                "hetlora.weighting", self.weighting, f"one of {', '.join(WEIGHTINGS)}"
            )


def pruned_rank(rank: int, gamma: float, min_rank: int) -> int:
    """HetLoRA's pruning step: r <- max(r_min, floor(gamma * r))."""
    return max(min_rank, math.floor(gamma * rank))


def sparsity_weights(updates: list[LoraPairs], per_module: bool) -> dict[str, np.ndarray]:
    """Normalised S_k / sum S with S_k = ||B_k A_k||_F, per module or one per client.

    One S_k per client is sqrt(sum over modules of ||B_k,m A_k,m||_F^2). Clients whose update is
    all zero would make sum S zero; then every client gets the same weight.
    """
    modules = list(updates[0])
    norms = np.array([[la.product_frobenius_norm(*pairs[m]) for m in modules] for pairs in updates])
    if not per_module:
        norms = np.repeat(np.sqrt((norms**2).sum(axis=1, keepdims=True)), len(modules), axis=1)
    weights = {}
    for j, module in enumerate(modules):
        column = norms[:, j]
        weights[module] = la.normalize_weights(column if column.sum() > 0 else np.ones_like(column))
    return weights


class HetLoRA(LoRAStrategy):
    """HetLoRA (Cho et al., EMNLP 2024): truncation, rank self-pruning, sparsity weighting."""

    name = "hetlora"
    description = "HetLoRA: truncation, local rank self-pruning, sparsity-weighted aggregation"
    options_class = HetLoRAOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ranks: dict[int, int] = {}  # a client's current rank once it has pruned

    def client_rank(self, client_id: int) -> int:
        return self.ranks.get(client_id, super().client_rank(client_id))

    def client_config(self, server_round: int, client_id: int) -> dict:
        if not self.options.prune:
            return {}
        return {
            wire.PRUNE_GAMMA: self.options.prune_gamma,
            wire.PRUNE_LAMBDA: self.options.prune_lambda,
            wire.PRUNE_MIN_RANK: self.options.min_rank,
        }

    def allowed_reply_ranks(self, client_id: int, sent_rank: int) -> set[int]:
        allowed = {sent_rank}
        if self.options.prune:
            allowed.add(pruned_rank(sent_rank, self.options.prune_gamma, self.options.min_rank))
        return allowed

    def accept(self, update: ClientUpdate) -> None:
        self.ranks[update.client_id] = update.rank

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": {str(client): rank for client, rank in self.ranks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranks = {int(client): int(rank) for client, rank in state["ranks"].items()}

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        r_max = self.global_rank()
        lora = [u.lora for u in updates]
        if self.options.weighting == "uniform":
            uniform = la.normalize_weights([1.0] * len(updates))
            weights = {m: uniform for m in global_lora}
        else:
            weights = sparsity_weights(lora, self.options.weighting == "sparsity-per-module")
        aggregated: LoraPairs = {}
        for module in global_lora:  # zero-padding with this module's weights
            aggregated |= pad_and_sum(lora, [module], r_max, weights[module])
        return aggregated
