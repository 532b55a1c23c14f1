"""FLoRIST: SVD of the stacked factors, singular value thresholding, one global low-rank pair.

Ramesh and Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated
Fine-Tuning of Large Language Models", arXiv 2506.09199 (MLSys 2026). See docs/methods/florist.md.

Per LoRA module, with p_k = n_k / sum(n) and the replies at the global scaling s_g:

- Aggregate: the stacks B_s = [B_1 | ... | B_K] and A_s = [p_1 A_1; ...; p_K A_K] give
  W = B_s A_s = sum_k p_k B_k A_k exactly; orthonormal bases of the two stacks, found separately,
  leave a small core whose SVD is that of W = U diag(S) V^T
  (:func:`hetfed.lora_algebra.factored_svd`: W, d_out x d_in, is never formed while the reply
  ranks sum to less than the layer's width).
- Threshold: keep the fewest leading components whose squared singular values hold
  ``florist.threshold`` of the energy, p (:func:`hetfed.lora_algebra.energy_rank`); the global
  pair is B = U_p diag(S_p), A = V^T_p. hetfed's global adapter has the fixed rank r_max: p > r_max
  keeps the leading r_max; p < r_max fills components p.. r_max-1 with B = 0 and A = the next
  right singular vectors (:func:`hetfed.aggregation.thresholded_svd_modules`).
- Distribute: client k gets the truncation B[:, :r_k] s_g / s_k, A[:r_k, :] (the base's
  truncation with ``lora.rescale``): the global pair is SVD-ordered, so s_k B_k A_k is the best
  rank-min(r_k, p) part of the thresholded update, and any components beyond p start as a fresh
  LoRA component does (B = 0).
- The task head is averaged with p_k (the base class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import thresholded_svd_modules
from hetfed.errors import ConfigError
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


@dataclass(frozen=True)
class FLoRISTOptions:
    """Options under ``florist.``: ``threshold``, the share of the squared singular-value energy
    the global pair keeps (the authors' code defaults to 0.9; the paper tunes it in 0.80..0.99)."""

    threshold: float = 0.9

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and 0 < self.threshold <= 1):
            raise ConfigError("florist.threshold", self.threshold, "a number in (0, 1]")


class FLoRIST(LoRAStrategy):
    """FLoRIST (Ramesh and Dass, arXiv 2506.09199): thresholded SVD of the stacked updates."""

    name = "florist"
    description = "FLoRIST: SVD of the stacked factors, energy-thresholded global pair, truncated"
    options_class = FLoRISTOptions
    requires = {
        "lora.rescale": (True, "it sends each client B[:, :r_k] s_g / s_k of the SVD-ordered pair")
    }

    @cached_property
    def energy_ranks(self) -> dict[str, int]:
        """Each module's energy rank p at its latest aggregation (before the r_max cap): what
        the threshold chose (not checkpointed: it is recomputed every round)."""
        return {}

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        weights = self.policy_weights(updates)  # p_k; the replies are at s_g
        lora, ranks = thresholded_svd_modules(
            [u.lora for u in updates], global_lora, weights, self.options.threshold
        )
        self.energy_ranks |= ranks
        return lora
