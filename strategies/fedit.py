"""FedIT: homogeneous LoRA with FedAvg of A and B (the baseline every method is compared to).

Every client trains the same rank r; the server averages each factor with the data weights
p_k = n_k / sum(n): A <- sum_k p_k A_k, B <- sum_k p_k B_k. This is inexact for the product,
sum_k p_k B_k A_k != (sum_k p_k B_k)(sum_k p_k A_k), which is what later methods fix.
Reference: Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024 (arXiv 2305.05644).
"""

from __future__ import annotations

from dataclasses import dataclass

from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import padded_weighted_sum
from hetfed.errors import ConfigError
from hetfed.rank_policies import UniformRank
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


@dataclass(frozen=True)
class FedITOptions:
    """``fedit.rank``: the one rank every client trains; 0 means the smallest tier rank, the
    largest rank that every device can afford."""

    rank: int = 0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError("fedit.rank", self.rank, "0 (smallest tier rank) or an integer >= 1")


class FedIT(LoRAStrategy):
    """Homogeneous LoRA: one rank for every client, FedAvg of A and B."""

    name = "fedit"
    description = "Homogeneous LoRA (FedIT): every client one rank, FedAvg of A and B"
    options_class = FedITOptions

    def make_rank_policy(self) -> UniformRank:
        return UniformRank(self.options.rank or self.profiles.min_rank)

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        # every factor has the global rank, so padding is the identity: plain FedAvg
        weights = self.policy_weights(updates)
        return padded_weighted_sum(
            [u.lora for u in updates], global_lora, self.global_rank(), weights
        )
