"""HeLoRA-Pad: truncation, context-based padding, rank-based adaptive aggregation.

Fan et al., "HeLoRA: LoRA-heterogeneous Federated Fine-tuning for Foundation Models", ACM TOIT
25(2), 2025. See docs/methods/helora-pad.md.

- Distribute [paper]: client k gets the truncation B[:, :r_k], A[:r_k, :] of the rank-r_max
  global modules (as HetLoRA).
- Context-based padding [paper names it; fillers from the authors' code]: each reply is padded
  to r_max (new columns of B_k, new rows of A_k) with ``filler``:
  ``zero``; ``mean`` (the matrix's scalar mean); ``linear`` (new rows of A = A_k.mean(axis=0),
  new columns of B = B_k.mean(axis=1)); ``adjacent`` (copies of A_k's last row, B_k's last
  column). Default [choice]: ``linear``.
- Rank-based adaptive aggregation [paper names it; the authors' code has plain FedAvg]:
  ``rank-weighted`` [choice, default]: w_k = n_k r_k / sum_j n_j r_j,
      B <- sum_k w_k B~_k,  A <- sum_k w_k A~_k  (B~_k, A~_k the padded factors);
  ``per-rank-index``: rank index i averaged over the clients with r_k > i with weights n_k
  renormalised within that subset (RBLA-like, no padding; an index no reply holds keeps its
  global value).
"""

from __future__ import annotations

from dataclasses import dataclass

from hetfed import lora_algebra as la
from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import padded_weighted_sum, per_index_average
from hetfed.errors import ConfigError
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate

AGGREGATIONS = ("rank-weighted", "per-rank-index")


@dataclass(frozen=True)
class HeLoRAPadOptions:
    """Options under ``helora-pad.``: the padding filler and the aggregation rule."""

    filler: str = "linear"
    aggregation: str = "rank-weighted"

    def __post_init__(self) -> None:
        if self.filler not in la.FILLERS:
            raise ConfigError("helora-pad.filler", self.filler, f"one of {', '.join(la.FILLERS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                "helora-pad.aggregation", self.aggregation, f"one of {', '.join(AGGREGATIONS)}"
            )
        if self.aggregation == "per-rank-index" and self.filler != "linear":
            raise ConfigError(
                "helora-pad.filler",
                self.filler,
                "the default 'linear' (leave the key unset): the filler is not used by "
                "helora-pad.aggregation = 'per-rank-index', which pads nothing",
            )


class HeLoRAPad(LoRAStrategy):
    """HeLoRA-Pad (Fan et al., ACM TOIT 2025): truncation, context padding, rank weighting."""

    name = "helora-pad"
    description = "HeLoRA-Pad: truncation, context-based padding, rank-based adaptive aggregation"
    options_class = HeLoRAPadOptions

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        replies = [u.lora for u in updates]
        if self.options.aggregation == "per-rank-index":
            return per_index_average(replies, global_lora, self.policy_weights(updates))
        weights = la.normalize_weights([u.num_examples * u.rank for u in updates])
        return padded_weighted_sum(
            replies, global_lora, self.global_rank(), weights, self.options.filler
        )
