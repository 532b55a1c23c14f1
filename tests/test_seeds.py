"""One seed tree: no two random streams of a run coincide, and a seed varies the data too."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hetfed import seeds
from hetfed.config import parse_run_config
from hetfed.data import load_partition, load_splits
from hetfed.seeds import Stream

ROUNDS, ATTEMPTS, CLIENTS = range(1, 4), range(3), range(6)


def _first_word(generator: np.random.Generator) -> int:
    return int(generator.integers(2**63))


def run_streams(seed: int) -> dict[tuple, int]:
    """The first draw of every random stream of a run with ``seed`` (3 rounds, 3 attempts,
    6 clients, 3 data splits), by where it is drawn."""
    draws: dict[tuple, int] = {}
    for t, a in itertools.product(ROUNDS, ATTEMPTS):
        draws["sampling", t, a] = _first_word(seeds.sampling_rng(seed, t, a))
        draws["faults", t, a] = _first_word(seeds.fault_rng(seed, t, a))
        draws["fedra", t, a] = _first_word(seeds.fedra_allocation_rng(seed, t, a))
    for t, c in itertools.product(ROUNDS, CLIENTS):
        draws["layers", t, c] = _first_word(seeds.layer_rng(seed, t, c))
        local = seeds.local_seed(seeds.round_seed(seed, t), c)
        draws["local", t, c] = local
        draws["batch-order", t, c] = seeds.batch_order_seed(local)
        draws["dropout", t, c] = seeds.dropout_seed(local)
    for t in ROUNDS:
        draws["fresh-lora", t] = _first_word(seeds.fresh_lora_rng(seed, t))
        draws["round", t] = seeds.round_seed(seed, t)
    draws["initial-adapter"] = seeds.initial_adapter_seed(seed)
    draws["model"] = seeds.model_seed(seed)
    for stream in (
        Stream.TEST_SPLIT,
        Stream.SERVER_SPLIT,
        Stream.TEST_SUBSET,
        Stream.VALIDATION_SPLIT,
    ):
        draws[stream.name] = _first_word(seeds.rng(seed, stream))
    for split in range(3):
        draws["shuffle", split] = _first_word(seeds.rng(seed, Stream.SHUFFLE, split))
    draws["partition"] = seeds.integer_seed(seed, Stream.PARTITION)
    return draws


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_no_two_streams_of_a_run_coincide(seed):
    draws = run_streams(seed)
    assert len(set(draws.values())) == len(draws)
    # the coincidences of the former formulas: [seed, t, attempt] == [seed, t, client] and
    # [seed, purpose] == [seed, round]; seed * P + t + c gave (t, c) and (c, t) one seed
    assert draws["sampling", 1, 2] != draws["layers", 1, 2]
    assert draws["local", 1, 2] != draws["local", 2, 1]
    assert all(0 <= value < 2**63 for value in draws.values())


def test_streams_are_the_same_for_the_same_seed_and_differ_across_seeds():
    assert run_streams(3) == run_streams(3)
    first, second = run_streams(3), run_streams(4)
    assert all(first[where] != second[where] for where in first)


def _partition_texts(config: dict, partition: int = 0) -> list[str]:
    settings, _ = parse_run_config(config, strict=False)
    return sorted(load_partition(settings.data, partition, 4)["text"])


def test_a_seed_varies_the_partition_and_the_test_subset_unless_data_seed_is_pinned(
    topics_corpus,
):
    config = {
        "data.source": str(topics_corpus),
        "data.partitioner": "dirichlet",
        "data.max-test-examples": 50,
    }
    one, again, two = ({**config, "seed": s} for s in (1, 1, 2))
    assert _partition_texts(one) == _partition_texts(again)
    assert _partition_texts(one) != _partition_texts(two)
    tests = [
        sorted(load_splits(parse_run_config(c, strict=False)[0].data).test["text"])
        for c in (one, again, two)
    ]
    assert tests[0] == tests[1] and tests[0] != tests[2]
    pinned = [{**c, "data.seed": 42} for c in (one, two)]
    assert _partition_texts(pinned[0]) == _partition_texts(pinned[1])
    assert parse_run_config(two, strict=False)[0].data.seed == 2
