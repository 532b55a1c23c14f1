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

from collections.abc import Sequence

from hetfed import lora_algebra as la
from hetfed.wire import LoraPairs
from strategies.base import ClientUpdate, LoRAStrategy


def average_rank_indices(
    replies: Sequence[LoraPairs], global_lora: LoraPairs, weights: Sequence[float]
) -> LoraPairs:
    """Per module, :func:`hetfed.lora_algebra.average_per_rank_index` at the global rank; rank
    indices that no reply holds keep the global module's values."""
    aggregated = {}
    for module, (global_b, global_a) in global_lora.items():
        held = max(pairs[module][0].shape[1] for pairs in replies)
        b, a = la.average_per_rank_index(
            [pairs[module][0] for pairs in replies],
            [pairs[module][1] for pairs in replies],
            weights,
            global_b.shape[1],
        )
        b[:, held:] = global_b[:, held:]
        a[held:, :] = global_a[held:, :]
        aggregated[module] = (b, a)
    return aggregated


class RBLA(LoRAStrategy):
    """RBLA (Chen et al., arXiv 2408.08699): truncation, per-rank-index averaging with p_k."""

    name = "rbla"
    description = "RBLA: truncation, each rank index averaged over the clients that hold it"
    options_class = None

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        weights = la.normalize_weights([u.num_examples for u in updates])
        return average_rank_indices([u.lora for u in updates], global_lora, weights)
