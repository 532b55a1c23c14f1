"""Every random stream of a run: one seed tree, a distinct tag per stream.

A stream is numpy's ``SeedSequence(seed, spawn_key=(tag, *where))``: the run's ``seed`` (or the
data's, ``data.seed``, which follows the run's seed unless a run pins it), the stream's tag
(:class:`Stream`) and where the draw happens (round, retry attempt, client id). Two streams of
a run never coincide: their spawn keys differ in the tag, or, within one stream, in where
(``tests/test_seeds.py`` draws every stream of a run and checks it). A draw depends only on
these, never on what a process did before, so a resumed run, a run whose clients land on other
workers and a run with other Flower node ids all draw the same. Client ids are the stable ids
of :mod:`strategies.nodes`, not Flower's node ids.

PyTorch takes an integer seed: :func:`integer_seed` is the first 64-bit word of a stream.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """The tag of each random stream (a new stream takes a new number)."""

    SAMPLING = 1  # which clients a round (or a retry attempt) samples
    FAULTS = 2  # failure injection: which sampled clients misbehave, and how
    LAYERS = 3  # RGD-HLA's and FIM-HLA's draw of a client's transformer blocks
    FRESH_LORA = 4  # FLoRA's fresh A after a round's merge
    ROUND = 5  # the seed a train message carries (and HeLoRA-KD's distillation)
    LOCAL = 6  # a client's local training (batch order, dropout), from the round's seed
    INITIAL_ADAPTER = 7  # the global adapter's initialisation
    MODEL = 8  # the base model's random parts (a classifier's head), on every process alike
    TEST_SPLIT = 9  # data: the test split cut from a source without one
    SERVER_SPLIT = 10  # data: the server split
    TEST_SUBSET = 11  # data: data.max-test-examples
    SHUFFLE = 12  # data: each split's order (where = which split)
    PARTITION = 13  # data: the flwr-datasets partitioner's seed
    BATCH_ORDER = 14  # a training loop's shuffles (a client's local steps, HeLoRA-KD's epochs)
    DROPOUT = 15  # a training loop's dropout draws
    VALIDATION_SPLIT = 16  # data: the validation split (data.validation-examples)
    FEDRA_ALLOCATION = 17  # FedRA's allocation matrix of a round (and retry attempt)
    EVALUATION_SAMPLING = 18  # which clients a round's federated evaluation asks
    LOCAL_SPLITS = 19  # data: a client's local test and validation splits (one draw)


def sequence(seed: int, stream: Stream, *where: int) -> np.random.SeedSequence:
    """The node of the seed tree of ``stream`` at ``where``."""
    return np.random.SeedSequence(seed, spawn_key=(int(stream), *map(int, where)))


def rng(seed: int, stream: Stream, *where: int) -> np.random.Generator:
    """A numpy generator of ``stream`` at ``where``."""
    return np.random.default_rng(sequence(seed, stream, *where))


def integer_seed(seed: int, stream: Stream, *where: int) -> int:
    """An integer seed of ``stream`` at ``where`` (PyTorch, flwr-datasets): in [0, 2**63)."""
    return int(sequence(seed, stream, *where).generate_state(1, np.uint64)[0] >> np.uint64(1))


def round_seed(seed: int, server_round: int) -> int:
    """The seed a train message carries, and of HeLoRA-KD's server-side distillation."""
    return integer_seed(seed, Stream.ROUND, server_round)


def local_seed(round_seed: int, client_id: int) -> int:
    """A client's local training (batch order, dropout), from the message's round seed."""
    return integer_seed(round_seed, Stream.LOCAL, client_id)


def batch_order_seed(seed: int) -> int:
    """The shuffles of a training loop seeded ``seed`` (a client's local seed)."""
    return integer_seed(seed, Stream.BATCH_ORDER)


def dropout_seed(seed: int) -> int:
    """The dropout draws of a training loop seeded ``seed``: a stream apart from its order."""
    return integer_seed(seed, Stream.DROPOUT)


def sampling_rng(seed: int, server_round: int, attempt: int) -> np.random.Generator:
    """Which clients a round (or its retry ``attempt``) samples."""
    return rng(seed, Stream.SAMPLING, server_round, attempt)


def evaluation_sampling_rng(seed: int, server_round: int) -> np.random.Generator:
    """Which clients a round's federated evaluation asks (``fraction-evaluate``)."""
    return rng(seed, Stream.EVALUATION_SAMPLING, server_round)


def fault_rng(seed: int, server_round: int, attempt: int) -> np.random.Generator:
    """Failure injection (``faults.*``): which sampled clients misbehave, and how."""
    return rng(seed, Stream.FAULTS, server_round, attempt)


def layer_rng(seed: int, server_round: int, client_id: int) -> np.random.Generator:
    """RGD-HLA's and FIM-HLA's draw of the transformer blocks a client trains."""
    return rng(seed, Stream.LAYERS, server_round, client_id)


def fresh_lora_rng(seed: int, server_round: int) -> np.random.Generator:
    """FLoRA's fresh A after the merge of ``server_round``."""
    return rng(seed, Stream.FRESH_LORA, server_round)


def initial_adapter_seed(seed: int) -> int:
    """The global adapter's initialisation (A random, B zero)."""
    return integer_seed(seed, Stream.INITIAL_ADAPTER)


def model_seed(seed: int) -> int:
    """The base model's random parts (a classifier's head), the same on every process."""
    return integer_seed(seed, Stream.MODEL)


def fedra_allocation_rng(seed: int, server_round: int, attempt: int) -> np.random.Generator:
    """FedRA's allocation matrix: the transformer blocks of every client of a round (or its
    retry ``attempt``), drawn together."""
    return rng(seed, Stream.FEDRA_ALLOCATION, server_round, attempt)
