"""Zero-padding: the naive heterogeneous-rank baseline ("naive HetLoRA").

The server keeps every LoRA module at r_max (the largest tier rank). Client k receives the
truncation B[:, :r_k], A[:r_k, :]. Each reply is padded with zeros back to r_max,

    B~_k = [B_k | 0],   A~_k = [A_k; 0],

and both factors are averaged with the data weights p_k = n_k / sum(n):

    B <- sum_k p_k B~_k,     A <- sum_k p_k A~_k.

Rank index i is therefore shrunk by the share of data whose clients lack it. HetLoRA (Cho et
al., EMNLP 2024, arXiv 2401.06432) replaces p_k with sparsity weights; HeLoRA-Pad (Fan et al.,
ACM TOIT 25(2) 2025) replaces the zeros with other fillers and the weights with n_k r_k. See
docs/methods/zeropad.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hetfed import lora_algebra as la
from hetfed.wire import LoraPairs
from strategies.base import ClientUpdate, LoRAStrategy


def pad_and_sum(
    replies: Sequence[LoraPairs],
    modules: Iterable[str],
    rank: int,
    weights: Sequence[float],
    filler: str = "zero",
) -> LoraPairs:
    """Per module: pad every client's (B_k, A_k) to ``rank`` with ``filler``, then
    B <- sum_k w_k B~_k and A <- sum_k w_k A~_k (weights as given)."""
    aggregated = {}
    for module in modules:
        padded = [la.pad(*pairs[module], rank, filler) for pairs in replies]
        aggregated[module] = (
            la.weighted_sum([b for b, _ in padded], weights),
            la.weighted_sum([a for _, a in padded], weights),
        )
    return aggregated


class ZeroPad(LoRAStrategy):
    """Truncation to each budget, zero-padding to r_max, FedAvg of B and A with p_k."""

    name = "zeropad"
    description = "Zero-padding (naive HetLoRA): truncate to each rank, zero-pad, FedAvg of B and A"
    options_class = None

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        weights = la.normalize_weights([u.num_examples for u in updates])
        return pad_and_sum([u.lora for u in updates], global_lora, self.global_rank(), weights)
