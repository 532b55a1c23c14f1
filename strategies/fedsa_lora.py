"""FedSA-LoRA: only A is shared and averaged; each client keeps its own B across rounds.

Guo, Zeng, Wang, Fan, Wang and Qu, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025 (arXiv 2410.01463). See docs/methods/fedsa-lora.md.

- Distribute: client k gets A[:r_k, :] (HetLoRA's truncation) and the head; no B. Its train
  instruction names B ``personal``: the client trains its own B from the value it kept after its
  last round (peft's B = 0 the first time) and does not return it
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

import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from hetfed import adapter_state, wire
from hetfed.adapter_state import LORA_A, LORA_B, LoraPairs, State
from hetfed.aggregation import head_average
from hetfed.errors import ConfigError
from hetfed.lora_algebra import average_per_rank_index
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate

PERSONAL_KEY = "personal-key"  # of the strategy's checkpointed state


def average_a(replies: Sequence[np.ndarray], weights: Sequence[float], global_a: np.ndarray):
    """FedSA-LoRA's A (r_max x d_in) from the replies' A_k (r_k x d_in): row i is
    sum_{k: r_k > i} p_k A_k[i, :] / sum_{k: r_k > i} p_k (RBLA's per-index average of A,
    :func:`hetfed.lora_algebra.average_per_rank_index`); rows no reply holds keep their global
    values."""
    unused_b = [np.zeros((1, a.shape[0]), a.dtype) for a in replies]  # the rule needs no B
    _, averaged = average_per_rank_index(unused_b, replies, weights, global_a.shape[0])
    held = max(a.shape[0] for a in replies)
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
        self.personal_key = uuid.uuid4().hex  # this run's; a resume restores it

    def client_instruction(
        self, server_round: int, client_id: int, instruction: wire.TrainInstruction
    ) -> wire.TrainInstruction:
        return replace(instruction, personal=self.personal, personal_key=self.personal_key)

    def distribute(self, global_state: State, rank: int) -> State:
        """A[:r_k, :] and the head: B never leaves a client, so none is sent."""
        sent = super().distribute(global_state, rank)
        return {k: v for k, v in sent.items() if adapter_state.factor_of(k) not in self.personal}

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], global_state: State
    ) -> State:
        """Each A per rank index over the replies (:func:`average_a`), the head with p_k, B and
        the rest of the global state kept."""
        examples = [u.num_examples for u in updates]
        weights = np.asarray(examples, dtype=np.float64) / sum(examples)  # p_k
        new_state = dict(global_state)
        for key, global_a in global_state.items():
            if adapter_state.factor_of(key) == LORA_A:
                new_state[key] = average_a([u.state[key] for u in updates], weights, global_a)
        _, global_head = adapter_state.split_state(global_state)
        heads = [{k: u.state[k] for k in global_head} for u in updates]
        return new_state | head_average(heads, examples, global_head)

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        raise NotImplementedError("FedSA-LoRA aggregates A alone (aggregate), never factor pairs")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), PERSONAL_KEY: self.personal_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.personal_key = state[PERSONAL_KEY]
