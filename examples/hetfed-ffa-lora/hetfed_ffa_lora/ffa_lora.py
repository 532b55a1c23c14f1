"""FFA-LoRA: A frozen at a shared random init, only B trained and averaged (exact).

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024
(arXiv 2403.12313). The paper trains one rank on every client; hetfed adds heterogeneous ranks
by truncation, as HetLoRA distributes.

- Initialise [paper]: the server's seeded initialisation draws A (random) and B = 0 at the
  global rank r_max. A is never trained again: every client gets the train instruction
  ``frozen = ["lora_A"]``, and the server keeps the global A bit for bit (it never reads a
  client's A, which the client returns unchanged).
- Distribute [as HetLoRA]: client k gets A[:r_k, :] and B[:, :r_k].
- Scaling [choice]: every client scales by the global s = alpha / r_max (its LoRA alpha is
  alpha r_k / r_max), so a rank-r_k adapter is exactly the first r_k rank components of the
  global one, s B[:, :r_k] A[:r_k, :], and B_k is comparable across ranks.
- Aggregate [paper for one rank: FedAvg of B]: :func:`aggregate_b` per module, with the data
  weights p_k = n_k / sum(n).

A is the same on every client, so averaging B is exact for the product,
sum_k p_k s B_k A = s (sum_k p_k B_k) A, without FedIT's cross terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from hetfed import adapter_state, wire
from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import padded_weighted_sum, per_index_average
from hetfed.errors import ConfigError
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate

AGGREGATIONS = ("per-rank-index", "zero-pad")


@dataclass(frozen=True)
class FFALoRAOptions:
    """Options under ``ffa-lora.``: ``aggregation``, how the rank indices of B are averaged
    (see :func:`aggregate_b`)."""

    aggregation: str = "per-rank-index"

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                "ffa-lora.aggregation", self.aggregation, f"one of {', '.join(AGGREGATIONS)}"
            )


def aggregate_b(
    replies: Sequence[LoraPairs],
    global_lora: LoraPairs,
    weights: Sequence[float],
    per_rank_index: bool,
) -> LoraPairs:
    """New global modules: A unchanged, B averaged per rank index.

    With K_i = {k : r_k > i} the replies that hold rank index i and weights p_k:

    - per rank index (default): B[:, i] <- sum_{k in K_i} p_k B_k[:, i] / sum_{k in K_i} p_k,
      and an index that no reply holds keeps its global value (as RBLA);
    - zero-padding: B[:, i] <- sum_{k in K_i} p_k B_k[:, i], that is B <- sum_k p_k [B_k | 0].

    Both are exact because row i of A is the same on every client: s B[:, i] A[i, :] is exactly
    the weighted average of the clients' rank components s B_k[:, i] A[i, :]. Per rank index
    averages each component over the clients that trained it (the default: an index is not
    shrunk by clients that lack it); zero-padding makes s B A = sum_k p_k s B_k A[:r_k, :], the
    data-weighted mean of the client updates, in which index i is scaled by sum_{k in K_i} p_k.
    With one rank for every client both are FedAvg of B, the paper's rule.
    """
    if per_rank_index:
        averaged = per_index_average(replies, global_lora, weights)
    else:
        rank = next(iter(global_lora.values()))[1].shape[0]
        averaged = padded_weighted_sum(replies, global_lora, rank, weights)
    # A: the global factor itself, not the (equal up to rounding) average of the replies' copies
    return {module: (b, global_lora[module][1]) for module, (b, _) in averaged.items()}


class FFALoRA(LoRAStrategy):
    """FFA-LoRA (Sun et al., ICLR 2024): A frozen, B trained and averaged; ranks by truncation."""

    name = "ffa-lora"
    description = "FFA-LoRA: A frozen at a shared random init, only B trained and averaged (exact)"
    options_class = FFALoRAOptions

    def client_alpha(self, rank: int) -> float:
        return self.settings.lora.alpha * rank / self.global_rank()

    def client_instruction(
        self, server_round: int, client_id: int, instruction: wire.TrainInstruction
    ) -> wire.TrainInstruction:
        return replace(instruction, frozen=(adapter_state.LORA_A,))

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        weights = self.policy_weights(updates)  # p_k
        per_rank_index = self.options.aggregation == "per-rank-index"
        return aggregate_b([u.lora for u in updates], global_lora, weights, per_rank_index)
