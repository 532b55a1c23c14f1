"""FlexLoRA: aggregate the full-size updates, redistribute their best low-rank approximations.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024 (arXiv 2402.11505). See docs/methods/flexlora.md.

Per LoRA module, with p_k = n_k / sum(n) and each client's scaling s_k:

- Aggregate: W_g = sum_k p_k s_k B_k A_k = U diag(S) V^T, computed from the factors
  (:func:`hetfed.lora_algebra.factored_svd`, weights p_k times the scaling each reply's product
  is read at): while the replies' ranks sum to less than the layer's width the d_out x d_in
  matrix W_g is never formed; otherwise it is, and its leading triplets come from the Gram
  matrix of its smaller side (no full SVD). The server keeps the leading
  r_max = :meth:`global_rank` triplets as a LoRA module of the global scaling s_g:
  B = U diag(S) / s_g, A = V^T (:func:`hetfed.lora_algebra.svd_factors`), so s_g B A is the
  best rank-r_max approximation.
- Distribute: client k gets the best rank-r_k approximation of W_g,
  B_k = U[:, :r_k] diag(S[:r_k]) / s_k, A_k = V^T[:r_k, :]. The stored factors are SVD-ordered,
  so this is their truncation with B rescaled by s_g / s_k: exactly the base's truncation under
  hetfed's scaling rule (:mod:`hetfed.scaling`), which FlexLoRA therefore requires
  (``lora.rescale = true``). The initial global adapter (A random, B = 0) is not SVD-ordered,
  but its product is 0, and the truncation gives each client the zero update too.
- The task head is averaged with p_k (the base class).
"""

from __future__ import annotations

from hetfed import lora_algebra as la
from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import svd_modules
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


class FlexLoRA(LoRAStrategy):
    """FlexLoRA (Bai et al., NeurIPS 2024): SVD of the weighted sum, truncated per client."""

    name = "flexlora"
    description = "FlexLoRA: SVD of the summed full-size updates, best rank-r_k part per client"
    requires = {
        "lora.rescale": (True, "it sends each client B_k = U_r S_r / s_k, the rescaled truncation")
    }

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        """Per module: factored SVD of sum_k p_k s_k B_k A_k, kept at rank r_max.

        When the sum has fewer than r_max components (sum of the reply ranks, or d_out, d_in
        below r_max) the missing components are zero in both factors (a rank-r_max adapter that
        represents the same update).
        """
        s_g = self.global_spec().scaling
        p = la.normalize_weights([u.num_examples for u in updates])
        weights = [pk * u.scaling for pk, u in zip(p, updates, strict=True)]
        return svd_modules([u.lora for u in updates], global_lora, weights, scaling=s_g)
