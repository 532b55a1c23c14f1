"""FedEx-LoRA: average A and B, fold the residual of the average into the frozen weights.

Singhal, Ponkshe and Vepakomma, "Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025 (arXiv 2410.09432); code https://github.com/RaghavSinghal10/fedex-lora.
See docs/methods/fedex-lora.md.

Per LoRA module, with p_k the reply weights (n_k / sum(n) by default) and the replies at the
global scaling s_g (hetfed's conversion, :mod:`hetfed.scaling`):

- Average [paper]: B <- sum_k p_k B~_k, A <- sum_k p_k A~_k, the replies zero-padded to the
  global rank r_max [choice, the truncation rule: a rank-r_k client is sent B[:, :r_k],
  A[:r_k, :]] (:func:`hetfed.aggregation.padded_weighted_sum`).
- Residual [paper]: delta <- delta + sum_k p_k s_k B_k A_k - s_g B A
  (:func:`hetfed.aggregation.exact_residual_deltas`), so the global model W0 + delta + s_g B A
  moves by exactly the weighted sum of the clients' products. The deltas are FLoRA's mechanism:
  a dense ``<module>.base_layer.delta`` per module in the global state, sent with the adapter,
  added to W0 by every client and by the server's evaluation and export.
- ``fold-tail`` [choice, off by default]: a rank-r_k client also gets the tail
  s_g B[:, r_k:] A[r_k:, :] in its delta (:func:`hetfed.aggregation.tail_deltas`), so it starts
  from exactly the global model, and the residual adds it back
  (:func:`hetfed.aggregation.tail_pairs`): the global model is then the exact p_k-average of the
  clients' models.
- The task head is averaged with p_k (the base class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hetfed import adapter_state
from hetfed.adapter_state import LoraPairs, State
from hetfed.aggregation import (
    exact_residual_deltas,
    padded_weighted_sum,
    tail_deltas,
    tail_pairs,
)
from hetfed.errors import ConfigError
from hetfed.rank_policies import DATA_WEIGHTINGS, data_weights
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


@dataclass(frozen=True)
class FedExLoRAOptions:
    """Options under ``fedex-lora.``: ``weighting``, the reply weights p_k (``examples``:
    n_k / sum(n); ``uniform``: 1 / K, the authors' code); ``fold-tail``, whether a client of a
    smaller rank gets the truncated tail of the global adapter in its base delta."""

    weighting: str = "examples"
    fold_tail: bool = False

    def __post_init__(self) -> None:
        if self.weighting not in DATA_WEIGHTINGS:
            raise ConfigError("fedex-lora.weighting", self.weighting, " | ".join(DATA_WEIGHTINGS))


class FedExLoRA(LoRAStrategy):
    """FedEx-LoRA (Singhal et al., ACL 2025): FedAvg of A and B plus the exact residual in W0."""

    name = "fedex-lora"
    description = "FedEx-LoRA: average A and B, add the residual to the frozen weights (exact)"
    options_class = FedExLoRAOptions
    requires = {"model.quantize": ("none", "it adds the residual to the base weights")}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.options.fold_tail and not self.settings.lora.rescale:
            # the tail is s_g B[:, r:] A[r:, :] only when a client's factors mean s_g B_r A_r
            raise ConfigError("fedex-lora.fold-tail", True, "false unless lora.rescale = true")

    def reply_weights(self, updates: list[ClientUpdate]) -> list[float]:
        """p_k of the replies (``weighting``)."""
        return list(data_weights([u.num_examples for u in updates], self.options.weighting))

    def distribute(self, global_state: State, rank: int) -> State:
        """The truncation to ``rank`` with the deltas; with ``fold-tail`` the cut-off tail
        s_g B[:, rank:] A[rank:, :] is added to this client's deltas."""
        state = super().distribute(global_state, rank)
        if not self.options.fold_tail or rank >= self.global_rank():
            return state
        lora = adapter_state.split_state(global_state)[0]
        deltas = adapter_state.base_deltas(global_state)
        folded = tail_deltas(lora, deltas, rank, self.global_spec().scaling)
        return adapter_state.with_base_deltas(state, folded)

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        """B <- sum_k p_k B~_k, A <- sum_k p_k A~_k, zero-padded to the global rank."""
        replies = [u.lora for u in updates]
        return padded_weighted_sum(
            replies, global_lora, self.global_rank(), self.reply_weights(updates)
        )

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], global_state: State
    ) -> State:
        """The averaged adapter and head (the base), then the residual into the deltas."""
        state = super().aggregate(server_round, updates, global_state)
        old_lora = adapter_state.split_state(global_state)[0]
        p = self.reply_weights(updates)
        products = [u.lora for u in updates]
        weights = [pk * u.scaling for pk, u in zip(p, updates, strict=True)]  # p_k s_k
        s_g = self.global_spec().scaling
        if self.options.fold_tail:  # what each client held in its delta comes back in
            for pk, u in zip(p, updates, strict=True):
                if u.rank < self.global_rank():
                    products.append(tail_pairs(old_lora, u.rank))
                    weights.append(pk * s_g)
        new_lora = adapter_state.split_state(state)[0]
        deltas = exact_residual_deltas(
            products, weights, new_lora, s_g, adapter_state.base_deltas(global_state)
        )
        return adapter_state.with_base_deltas(adapter_state.trainable(state), deltas)
