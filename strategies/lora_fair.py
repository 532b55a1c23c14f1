"""LoRA-FAIR: FedAvg of B and A, with a server-side correction of B towards the ideal update.

Bian, Wang, Zhang and Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025 (arXiv 2411.14961). See docs/methods/lora-fair.md.

Averaging the factors separately is biased: (sum p_k B_k)(sum p_k A_k) != sum p_k B_k A_k.
LoRA-FAIR keeps A_avg and corrects B on the server. Per LoRA module, with p_k = n_k / sum(n) and
the replies zero-padded to the largest reply rank (r_max when a rank-r_max client replied):

- B_avg = sum_k p_k B~_k, A_avg = sum_k p_k A~_k, the ideal update dW = sum_k p_k B_k A_k;
- dB = argmin ||(B_avg + dB) A_avg - dW||_F^2 + lambda ||dB||_F^2
     = (dW - B_avg A_avg) A_avg^T (A_avg A_avg^T + lambda I)^-1,
  computed without dW (:func:`hetfed.lora_algebra.fair_correction`: r x r systems);
- the global pair is (B_avg + dB, A_avg); rank indices no reply holds keep their global values
  (:func:`hetfed.aggregation.fair_corrected_modules`);
- client k starts from its truncation (B_avg + dB)[:, :r_k], A_avg[:r_k, :] (the base's
  distribution, with B times s_g / s_k under ``lora.rescale``).

Under ``lora.rescale = false`` (the unconverted ablation) a reply's product is s_k B_k A_k, so dW
weighs it with p_k s_k / s_g to stay the mean update in the global adapter's units.
The task head is averaged with p_k (the base class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import fair_corrected_modules
from hetfed.errors import ConfigError
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


@dataclass(frozen=True)
class LoRAFAIROptions:
    """Options under ``lora-fair.``: ``correction-lambda``, the ridge weight lambda of the
    correction dB (``lambda`` itself cannot name a field); 0 is the plain least-squares fit."""

    correction_lambda: float = 0.01

    def __post_init__(self) -> None:
        if not (math.isfinite(self.correction_lambda) and self.correction_lambda >= 0):
            raise ConfigError(
                "lora-fair.correction-lambda", self.correction_lambda, "a finite number >= 0"
            )


class LoRAFAIR(LoRAStrategy):
    """LoRA-FAIR (Bian et al., ICCV 2025): averaged factors, B corrected towards sum p_k B_k A_k."""

    name = "lora-fair"
    description = "LoRA-FAIR: FedAvg of B and A, B corrected on the server to fit sum p_k B_k A_k"
    options_class = LoRAFAIROptions

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        weights = self.policy_weights(updates)  # p_k
        s_g = self.global_spec().scaling
        # dW in the global adapter's units: u.scaling is s_g unless lora.rescale = false
        products = [pk * u.scaling / s_g for pk, u in zip(weights, updates, strict=True)]
        return fair_corrected_modules(
            [u.lora for u in updates],
            global_lora,
            weights,
            self.options.correction_lambda,
            products,
        )
