"""RBLA: rank-based LoRA aggregation, each rank index averaged over the clients that have it.

Chen et al., "RBLA: Rank-Based-LoRA-Aggregation for Fine-tuning Heterogeneous Models in FLaaS",
arXiv 2408.08699. See docs/methods/rbla.md.

The server keeps every module at r_max; client k receives the truncation B[:, :r_k], A[:r_k, :]
(broadcast by slicing). With K_i = {k : r_k > i} the clients holding rank index i, column i of B
and row i of A become

    B[:, i] <- sum_{k in K_i} p_k B_k[:, i] / sum_{k in K_i} p_k,
    A[i, :] <- sum_{k in K_i} p_k A_k[i, :] / sum_{k in K_i} p_k,

with p_k = n_k / sum(n), so an index is not diluted by clients that never trained it.
[choice] An index that no reply of the round holds (K_i empty, e.g. only small clients answered)
keeps its previous global value.
"""

from __future__ import annotations

from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import per_index_average
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


class RBLA(LoRAStrategy):
    """RBLA (Chen et al., arXiv 2408.08699): truncation, per-rank-index averaging with p_k."""

    name = "rbla"
    description = "RBLA: truncation, each rank index averaged over the clients that hold it"

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        weights = self.policy_weights(updates)  # p_k
        return per_index_average([u.lora for u in updates], global_lora, weights)
