"""HetLoRA: heterogeneous ranks by truncation, local rank self-pruning, sparsity-weighted sums.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024 (arXiv 2401.06432). See docs/methods/hetlora.md.

- Distribute: client k gets B[:, :r_k], A[:r_k, :] of the rank-r_max global modules.
- Train locally with f_k + lambda * ||B[:, q:]||_F ||A[q:, :]||_F, q = floor(gamma r_k); if that
  tail score decreased during the round the client prunes to max(r_min, q) and keeps the rank.
- Aggregate: zero-pad every reply to r_max and sum with weights S_k / sum S, S_k = ||B_k A_k||_F.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import padded_weighted_sum
from hetfed.errors import ConfigError
from hetfed.rank_policies import DEFAULT_PRUNING, SPARSITY_WEIGHTINGS, SelfPruning
from hetfed.wire import Pruning
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


@dataclass(frozen=True)
class HetLoRAOptions:
    """HetLoRA's options (``hetlora.*``); defaults from a public reimplementation (methods.md)."""

    prune: bool = True
    prune_gamma: float = DEFAULT_PRUNING.gamma
    prune_lambda: float = DEFAULT_PRUNING.lam
    min_rank: int = DEFAULT_PRUNING.min_rank
    weighting: str = "sparsity"

    def __post_init__(self) -> None:
        if not 0 < self.prune_gamma < 1:
            raise ConfigError("hetlora.prune-gamma", self.prune_gamma, "a number in (0, 1)")
        if self.prune_lambda < 0:
            raise ConfigError("hetlora.prune-lambda", self.prune_lambda, "a number >= 0")
        if self.min_rank < 1:
            raise ConfigError("hetlora.min-rank", self.min_rank, "an integer >= 1")
        if self.weighting not in SPARSITY_WEIGHTINGS:
            raise ConfigError(
                "hetlora.weighting", self.weighting, f"one of {', '.join(SPARSITY_WEIGHTINGS)}"
            )

    def pruning(self) -> Pruning | None:
        """The self-pruning clients are told to do (None: ``prune = false``)."""
        if not self.prune:
            return None
        return Pruning(self.prune_gamma, self.prune_lambda, self.min_rank)


class HetLoRA(LoRAStrategy):
    """HetLoRA (Cho et al., EMNLP 2024): truncation, rank self-pruning, sparsity weighting."""

    name = "hetlora"
    description = "HetLoRA: truncation, local rank self-pruning, sparsity-weighted aggregation"
    options_class = HetLoRAOptions

    def make_rank_policy(self) -> SelfPruning:
        return SelfPruning(self.profiles.max_rank, self.options.pruning(), self.options.weighting)

    @property
    def ranks(self) -> dict[int, Any]:
        """A client's current rank once it has pruned (kept by the rank policy)."""
        return self.rank_policy.ranks

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        weights = self.policy_weights(updates)  # S_k / sum S (per module or per client)
        return padded_weighted_sum(
            [u.lora for u in updates], global_lora, self.global_rank(), weights
        )
