"""Every random stream of a run, named, each with its one formula.

A draw depends only on the run's ``seed`` and on where it happens (round, retry attempt, client
id), never on what a process did before, so a resumed run, a run whose clients land on other
workers and a run with other Flower node ids all draw the same. Client ids are the stable ids
of :mod:`strategies.nodes`, not Flower's node ids.
"""

from __future__ import annotations

import numpy as np

_CLIENT_SPREAD = 1_000_003  # a prime above any client count: local seeds of one round differ
_ROUND_SPREAD = 100_003  # a prime above any round count: round seeds of two seeds differ


def round_seed(seed: int, server_round: int) -> int:
    """The seed a train message carries, and of HeLoRA-KD's server-side distillation."""
    return seed * _ROUND_SPREAD + server_round


def local_seed(round_seed: int, client_id: int) -> int:
    """A client's local training (batch order, dropout), from the message's round seed."""
    return round_seed + client_id % _CLIENT_SPREAD


def sampling_rng(seed: int, server_round: int, attempt: int) -> np.random.Generator:
    """Which clients a round (or its retry ``attempt``) samples."""
    return np.random.default_rng([seed, server_round, attempt])


def fault_rng(seed: int, server_round: int, attempt: int) -> np.random.Generator:
    """Failure injection (``faults.*``): which sampled clients misbehave, and how."""
    return np.random.default_rng([seed, server_round, attempt, 1])


def layer_rng(seed: int, server_round: int, client_id: int) -> np.random.Generator:
    """RGD-HLA's and FIM-HLA's draw of the transformer blocks a client trains."""
    return np.random.default_rng([seed, server_round, client_id])


def fresh_lora_rng(seed: int, server_round: int) -> np.random.Generator:
    """FLoRA's fresh A after the merge of ``server_round``."""
    return np.random.default_rng([seed, server_round])


def initial_adapter_seed(seed: int) -> int:
    """The global adapter's initialisation (A random, B zero) and the base model's random parts."""
    return seed
