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

from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import padded_weighted_sum
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


class ZeroPad(LoRAStrategy):
    """Truncation to each budget, zero-padding to r_max, FedAvg of B and A with p_k."""

    name = "zeropad"
    description = "Zero-padding (naive HetLoRA): truncate to each rank, zero-pad, FedAvg of B and A"

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        factors, weights = [u.lora for u in updates], self.policy_weights(updates)  # p_k
        return padded_weighted_sum(factors, global_lora, self.global_rank(), weights)
