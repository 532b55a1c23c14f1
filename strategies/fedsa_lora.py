"""FedSA-LoRA: only A is shared and averaged; each client keeps its own B across rounds.

Guo, Zeng, Wang, Fan, Wang and Qu, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025 (arXiv 2410.01463). See docs/methods/fedsa-lora.md.

- Distribute: client k gets A[:r_k, :] (HetLoRA's truncation) and the head. B is ``personal``
  (the base's class attribute): it is never sent, the client trains its own B from the value it
  kept after its last round (peft's B = 0 the first time) and does not return it
  (:mod:`client_apps.personal_state`, where it survives rounds and a resume).
- Aggregate: per rank index i, over the replies K_i = {k : r_k > i} that hold it,
  A[i, :] <- sum_{k in K_i} p_k A_k[i, :] / sum_{k in K_i} p_k with p_k = n_k / sum n
  (:func:`average_a`); the head with p_k (the base class). With one rank this is the paper's
  FedAvg of A.
- The global B stays at its initial value (zero): the server's model is the base with the
  shared head, and the method's figures are the federated evaluation's, each client scoring the
  global A with its own B on its own test split; FedSA-LoRA therefore needs
  ``fraction-evaluate > 0`` (and so ``data.local-test-fraction > 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hetfed.adapter_state import LORA_B, LoraPairs
from hetfed.errors import ConfigError
from hetfed.lora_algebra import average_per_rank_index, normalize_weights
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


def average_a(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float],
    global_a: np.ndarray,
) -> np.ndarray:
    """FedSA-LoRA's A (r_max x d_in) from the replies' A_k (r_k x d_in, with their B_k):
    row i is sum_{k: r_k > i} p_k A_k[i, :] / sum_{k: r_k > i} p_k (RBLA's per-index average,
    :func:`hetfed.lora_algebra.average_per_rank_index`, of which only A is kept); rows no
    reply holds keep their global values."""
    _, averaged = average_per_rank_index(bs, as_, weights, global_a.shape[0])
    held = max(a.shape[0] for a in as_)
    averaged[held:] = global_a[held:]
    return averaged


class FedSALoRA(LoRAStrategy):
    """FedSA-LoRA (Guo et al., ICLR 2025): A shared and averaged per rank index, B personal."""

    name = "fedsa-lora"
    description = "FedSA-LoRA: only A shared and averaged; each client keeps its own B"
    personal = (LORA_B,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.settings
        if settings.fraction_evaluate == 0:  # (> 0 needs data.local-test-fraction > 0 too)
            raise ConfigError(
                "fraction-evaluate",
                settings.fraction_evaluate,
                "a number > 0 for fedsa-lora: its model is each client's own B with the shared "
                "A, scored by federated evaluation on the clients' test splits",
            )

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        """Per module, A per rank index over the replies (:func:`average_a`, weights p_k), B
        kept at its global value (the replies' B are that value: clients keep theirs)."""
        weights = normalize_weights([u.num_examples for u in updates])  # p_k
        new = {}
        for module, (global_b, global_a) in global_lora.items():
            bs, as_ = zip(*(u.lora[module] for u in updates), strict=True)
            new[module] = (global_b, average_a(bs, as_, weights, global_a))
        return new
