"""HetLoRA: heterogeneous ranks by truncation, local rank self-pruning, sparsity-weighted sums.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024 (arXiv 2401.06432). See docs/methods/hetlora.md.

- Distribute: client k gets B[:, :r_k], A[:r_k, :] of the rank-r_max global modules.
- Train locally with f_k + lambda * ||B[:, q:]||_F ||A[q:, :]||_F, q = floor(gamma r_k); if that
  tail score decreased during the round the client prunes to max(r_min, q) and keeps the rank.
- Aggregate: zero-pad every reply to r_max and sum with weights S_k / sum S, S_k = ||B_k A_k||_F.
"""

from __future__ import annotations

from typing import Any

from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import padded_weighted_sum
from hetfed.rank_policies import HetLoRAOptions, SelfPruning
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


class HetLoRA(LoRAStrategy):
    """HetLoRA (Cho et al., EMNLP 2024): truncation, rank self-pruning, sparsity weighting."""

    name = "hetlora"
    description = "HetLoRA: truncation, local rank self-pruning, sparsity-weighted aggregation"
    options_class = HetLoRAOptions

    def make_rank_policy(self) -> SelfPruning:
        return SelfPruning(self.profiles.max_rank, self.options)

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
