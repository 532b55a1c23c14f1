"""raFLoRA: rank-partitioned aggregation, then FlexLoRA's SVD redistribution.

Wu, Hu, Min and Wang, "Preventing Rank Collapse in Federated Low-Rank Adaptation with Client
Heterogeneity", arXiv 2602.13486. See docs/methods/raflora.md.

FlexLoRA sums sum_k p_k B_k A_k: rank index i only gets the data share of the clients that hold
it, so with SVD redistribution the energy of the higher ranks shrinks round after round and
concentrates in the smallest shared rank ("rank collapse"). raFLoRA averages each rank partition
over the clients that hold it. Per LoRA module, with p_k = n_k / sum(n), the replies at the
global scaling s_g and the distinct reply ranks r_(1) < r_(2) < ... (r_(0) = 0):

- Partition j is the rank indices I_j = r_(j-1) .. r_(j)-1, held by K_j = {k : r_k >= r_(j)}:

      W = sum_j sum_{k in K_j} (p_k / sum_{h in K_j} p_h) B_k[:, I_j] A_k[I_j, :]

  (:func:`hetfed.lora_algebra.partitioned_svd`; W, d_out x d_in, is never formed while the
  reply ranks sum to less than the layer's width). With one rank this is FlexLoRA's sum.
- Aggregate and distribute as FlexLoRA: W = U diag(S) V^T, the server keeps
  B = U_r diag(S_r), A = V^T_r at r = r_max (fewer components: zero in both factors), and client
  k gets the truncation B[:, :r_k] s_g / s_k, A[:r_k, :], the best rank-r_k part of s_g W
  (:func:`hetfed.aggregation.svd_modules`).
- The task head is averaged with p_k (the base class).
"""

from __future__ import annotations

from hetfed import lora_algebra as la
from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import svd_modules
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


class RaFLoRA(LoRAStrategy):
    """raFLoRA (Wu et al., arXiv 2602.13486): rank partitions averaged over their holders."""

    name = "raflora"
    description = "raFLoRA: rank partitions averaged over the clients holding them, SVD per client"
    requires = {
        "lora.rescale": (True, "it sends each client B[:, :r_k] s_g / s_k of the SVD-ordered pair")
    }

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        weights = self.policy_weights(updates)  # p_k, renormalised within each partition
        return svd_modules([u.lora for u in updates], global_lora, weights, la.partitioned_svd)
