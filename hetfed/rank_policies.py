"""Rank policies: which rank each client trains, which reply ranks are accepted, and how the
replies of a set of modules are weighted. A strategy chooses one when it is built and the base
asks it (in the spirit of peft's LoRA variants: small objects chosen once):

- :class:`TierRanks`: each client trains its tier's rank, capped at the global rank (the largest
  tier rank); replies weighted by their data, p_k = n_k / sum(n).
- :class:`UniformRank`: one rank for every client (FedIT, Fed-HeLLo's layer methods); replies
  weighted by p_k or uniformly.
- :class:`SelfPruning`: HetLoRA's tier ranks with local rank self-pruning (Cho et al., EMNLP
  2024): each client keeps the rank it pruned to, may answer with
  :func:`~hetfed.rank_pruning.pruned_rank` of what it was sent, and replies are weighted by
  their sparsity S_k = ||B_k A_k||_F.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hetfed import lora_algebra as la
from hetfed.adapter_state import LoraPairs
from hetfed.aggregation import Weights, sparsity_weights
from hetfed.rank_pruning import pruned_rank
from hetfed.wire import Pruning

SPARSITY_WEIGHTINGS = ("sparsity", "sparsity-per-module", "uniform")  # HetLoRA's
DATA_WEIGHTINGS = ("uniform", "examples")  # 1 / K, or p_k = n_k / sum(n)
# HetLoRA's self-pruning as a public reimplementation sets it (docs/methods/hetlora.md)
DEFAULT_PRUNING = Pruning(gamma=0.99, lam=0.01, min_rank=1)


def data_weights(num_examples: Sequence[int], weighting: str = "examples") -> Sequence[float]:
    """p_k = n_k / sum(n) (``examples``), or 1 / K (``uniform``)."""
    return la.normalize_weights(
        num_examples if weighting == "examples" else [1.0] * len(num_examples)
    )


class TierRanks:
    """Each client trains its tier's rank (at most ``global_rank``); p_k weights."""

    def __init__(self, global_rank: int) -> None:
        self.global_rank = global_rank

    def client_rank(self, client_id: int, budget_rank: int) -> int:
        return min(budget_rank, self.global_rank)

    def pruning(self) -> Pruning | None:
        """The self-pruning instruction clients get (None: they return the rank they are sent)."""
        return None

    def allowed_reply_ranks(self, client_id: int, sent_rank: int) -> set[int]:
        return {sent_rank}

    def accept(self, client_id: int, rank: int) -> None:
        """A client answered with ``rank`` (after validation)."""

    def weights(self, replies: Sequence[LoraPairs], num_examples: Sequence[int]) -> Weights:
        return data_weights(num_examples)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (resume)."""


class UniformRank(TierRanks):
    """Every client trains ``rank``; replies weighted by ``weighting`` (``examples``: p_k)."""

    def __init__(self, rank: int, weighting: str = "examples") -> None:
        super().__init__(rank)
        self.weighting = weighting

    def client_rank(self, client_id: int, budget_rank: int) -> int:
        return self.global_rank

    def weights(self, replies: Sequence[LoraPairs], num_examples: Sequence[int]) -> Weights:
        return data_weights(num_examples, self.weighting)


class SelfPruning(TierRanks):
    """HetLoRA: tier ranks, self-pruning (``prune``; None: off), per-client ranks kept, and
    ``weighting`` one of :data:`SPARSITY_WEIGHTINGS`."""

    def __init__(self, global_rank: int, prune: Pruning | None, weighting: str) -> None:
        super().__init__(global_rank)
        self.prune, self.weighting = prune, weighting
        self.ranks: dict[int, int] = {}  # a client's current rank once it has pruned

    def client_rank(self, client_id: int, budget_rank: int) -> int:
        return self.ranks.get(client_id, super().client_rank(client_id, budget_rank))

    def pruning(self) -> Pruning | None:
        return self.prune

    def allowed_reply_ranks(self, client_id: int, sent_rank: int) -> set[int]:
        allowed = {sent_rank}
        if self.prune is not None:
            allowed.add(pruned_rank(sent_rank, self.prune.gamma, self.prune.min_rank))
        return allowed

    def accept(self, client_id: int, rank: int) -> None:
        self.ranks[client_id] = rank

    def weights(self, replies: Sequence[LoraPairs], num_examples: Sequence[int]) -> Weights:
        """S_k / sum S over the given modules (one S_k per reply, or per module), or 1 / K."""
        if self.weighting == "uniform":
            return data_weights(num_examples, "uniform")
        return sparsity_weights(replies, self.weighting == "sparsity-per-module")

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": {str(client): rank for client, rank in self.ranks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranks = {int(client): int(rank) for client, rank in state["ranks"].items()}
