"""FedRA on real Flower messages: a random allocation matrix of blocks every round, each block
averaged over the clients that trained it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from hetfed import adapter_state, seeds, wire
from hetfed.config import RunSettings, parse_run_config
from hetfed.errors import ConfigError
from hetfed.layer_allocation import allocation_matrix, sample_layers
from hetfed.profiles import parse_profiles
from strategies.fedra import FedRA, FedRAOptions
from strategies.rgd_hla import RGDHLA, RGDHLAOptions
from tests import harness
from tests.harness import InProcessGrid, global_state, sent_layers

L = 4
MODULES = [f"layer.{i}.{name}" for i in range(L) for name in ("query", "value")]
SEED = 5


def make(cls, options, tiers, nodes, seed=SEED):
    """A layer strategy on ``tiers`` (name -> layer budget, None: all), every tier rank 4, with
    a grid of one node per entry of ``nodes`` (client ids 1000, 1001, ...)."""
    lines = ["tiers:"] + [
        f"  {name}: {{rank: 4{'' if k is None else f', layers: {k}'}}}" for name, k in tiers.items()
    ]
    profiles = parse_profiles("\n".join(lines))
    settings = RunSettings(min_train_nodes=1, min_available_nodes=len(nodes), seed=seed)
    return cls(settings, profiles, options, L), InProcessGrid(nodes, profiles)


def allocations(strategy, grid, server_round, state=None):
    state = state or global_state(np.random.default_rng(0), 4, MODULES)
    messages = strategy.configure_train(server_round, wire.to_record(state), ConfigRecord(), grid)
    return {m.metadata.dst_node_id: sent_layers(m) for m in messages}


def replies(rng, n_examples):
    """Random replies of the sent shapes, only the sent blocks (and the head)."""
    sent = {}

    def reply(node, rank, arrays, layers):
        new = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in arrays.items()}
        if layers is not None:
            new = adapter_state.restrict_to_layers(new, layers)
        sent[node] = new
        metrics = wire.TrainReply(num_examples=n_examples[node], train_loss=1.0, rank=rank)
        return RecordDict({wire.ARRAYS: wire.to_record(new), wire.METRICS: metrics.to_record()})

    return reply, sent


UNIFORM = np.full(L, 1 / L)


def test_without_cover_the_matrix_is_rgd_hla_uniform_on_the_same_generator():
    budgets = [1, 3, L, 2, 2]
    matrix = allocation_matrix(np.random.default_rng(9), budgets, L)
    rng = np.random.default_rng(9)  # RGD-HLA's draw, client by client; a full row draws nothing
    expect = [list(range(L)) if k == L else sample_layers(rng, k, UNIFORM) for k in budgets]
    assert [np.flatnonzero(row).tolist() for row in matrix] == expect
    # through the strategies: FedRA's rows come from its own stream, RGD-HLA's from the layers'
    tiers = {"one": 1, "two": 2, "full": None}
    fedra, grid = make(FedRA, None, tiers, ("one", "two", "two", "full"))
    rgd, _ = make(RGDHLA, RGDHLAOptions(pattern="uniform"), tiers, ("one", "two", "two", "full"))
    sent = allocations(fedra, grid, 3)
    allocations(rgd, grid, 3)  # its clients' budgets known
    rng = seeds.fedra_allocation_rng(SEED, 3, 0)
    assert [sent[c] for c in (1000, 1001, 1002)] == [
        sample_layers(rng, k, UNIFORM) for k in (1, 2, 2)
    ]
    assert sent[1003] is None  # a full budget trains every block
    assert rgd.allocate(3, 1001, 2) == sample_layers(seeds.layer_rng(SEED, 3, 1001), 2, UNIFORM)
    # and both draw each 2-block subset with probability 1 / 6
    rounds = 3000
    for strategy in (fedra, rgd):
        counts = {}
        for t in range(1, rounds + 1):
            key = tuple(strategy.client_layers(t, 1001))
            counts[key] = counts.get(key, 0) + 1
        assert set(counts) == set(itertools.combinations(range(L), 2))
        # binomial standard deviation 0.0068 at 3000 rounds: 0.03 is > 4 sigma
        np.testing.assert_allclose(np.array(list(counts.values())) / rounds, 1 / 6, atol=0.03)


def test_cover_gives_every_block_when_the_budgets_allow_and_keeps_rows_uniform():
    rng = np.random.default_rng(4)
    for _ in range(300):
        budgets = rng.integers(1, L + 1, size=rng.integers(1, 5)).tolist()
        matrix = allocation_matrix(rng, budgets, L, cover=True)
        assert matrix.sum(axis=1).tolist() == budgets  # exactly K_c distinct blocks each
        assert matrix.any(axis=0).sum() == min(L, sum(budgets))  # as many as the budgets allow
    # each client's row alone is a uniform K_c-subset: every block with probability K_c / L
    budgets, draws = [1, 2, 1], 4000
    frequency = sum(allocation_matrix(rng, budgets, L, cover=True) for _ in range(draws)) / draws
    # binomial standard deviation <= 0.008 at 4000 draws: 0.035 is > 4 sigma
    expect = np.broadcast_to(np.array(budgets)[:, None] / L, frequency.shape)
    np.testing.assert_allclose(frequency, expect, atol=0.035)
    free = sum(allocation_matrix(rng, budgets, L).any(axis=0).all() for _ in range(draws)) / draws
    # without cover all four blocks are trained only when the rows are disjoint: 1/2 * 1/4
    assert abs(free - 1 / 8) < 0.03  # standard deviation 0.0052


def test_each_client_gets_its_budget_seeded_reproducible_and_new_each_round():
    tiers = {"one": 1, "two": 2, "three": 3, "full": None}
    nodes = ("one", "two", "two", "three", "full")
    strategy, grid = make(FedRA, None, tiers, nodes)
    budgets = {1000: 1, 1001: 2, 1002: 2, 1003: 3}
    first, second = allocations(strategy, grid, 1), allocations(strategy, grid, 2)
    for drawn in (first, second):
        assert drawn[1004] is None
        for node, k in budgets.items():
            assert len(drawn[node]) == len(set(drawn[node])) == k and drawn[node] == sorted(
                drawn[node]
            )
    assert first != second  # a new matrix every round
    again, grid = make(FedRA, None, tiers, nodes)
    assert allocations(again, grid, 1) == first  # the same seed draws the same matrix
    other, grid = make(FedRA, None, tiers, nodes, seed=SEED + 1)
    assert allocations(other, grid, 1) != first
    again.round.attempt = 1  # a retry (other clients, possibly) draws its own matrix
    assert [again.client_layers(1, c) for c in budgets] != [first[c] for c in budgets]
    # cover-all-layers: every round, every block has a client
    covered, grid = make(FedRA, FedRAOptions(cover_all_layers=True), {"one": 1}, ("one",) * L)
    for t in range(1, 21):
        drawn = allocations(covered, grid, t)
        assert sorted(layer for layers in drawn.values() for layer in layers) == list(range(L))


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_each_block_is_averaged_over_exactly_the_clients_that_trained_it(weighting):
    rng = np.random.default_rng(7)
    tiers = {"one": 1, "two": 2}
    strategy, grid = make(FedRA, FedRAOptions(weighting=weighting), tiers, ("one", "one", "two"))
    n_examples = {1000: 5, 1001: 20, 1002: 75}
    state = global_state(rng, 4, MODULES)
    untouched = 0
    for server_round in (1, 2):
        reply, sent = replies(rng, n_examples)
        messages, new = harness.train_round(strategy, state, reply, server_round, grid, True)
        layers = {m.metadata.dst_node_id: sent_layers(m) for m in messages}
        for msg in messages:  # the client gets every block; it trains and returns only its own
            arrays = wire.from_record(msg.content[wire.ARRAYS])
            assert set(arrays) == set(state)
            node = msg.metadata.dst_node_id
            assert set(sent[node]) == set(adapter_state.restrict_to_layers(state, layers[node]))
        for module in MODULES:
            block = adapter_state.layer_of(module)
            trained_it = [n for n in sorted(sent) if block in layers[n]]
            for key in (f"{module}.lora_A.weight", f"{module}.lora_B.weight"):
                if not trained_it:  # nobody trained it: kept bit for bit
                    np.testing.assert_array_equal(new[key], state[key])
                    untouched += 1
                    continue
                w = np.array([n_examples[n] if weighting == "examples" else 1 for n in trained_it])
                expect = sum(
                    wk / w.sum() * sent[n][key].astype(np.float64)
                    for wk, n in zip(w, trained_it, strict=True)
                )
                np.testing.assert_allclose(new[key], expect, rtol=1e-5, atol=1e-6)
        total = sum(n_examples.values())
        head = sum(
            n_examples[n] / total * sent[n]["classifier.weight"].astype(np.float64) for n in sent
        )
        np.testing.assert_allclose(new["classifier.weight"], head, rtol=1e-5)
        state = new
    assert untouched > 0  # budgets 1, 1, 2 of 4 blocks: some block was left each round


def test_options_are_run_config_keys_and_are_validated():
    flat = {"strategy": "fedra", "fedra.cover-all-layers": True, "fedra.weighting": "examples"}
    _, options = parse_run_config(flat, FedRAOptions, "fedra")
    assert options == FedRAOptions(cover_all_layers=True, weighting="examples")
    for kwargs, key in (
        ({"weighting": "sparsity"}, "fedra.weighting"),
        ({"rank": -1}, "fedra.rank"),
    ):
        with pytest.raises(ConfigError) as err:
            FedRAOptions(**kwargs)
        assert err.value.key == key


def test_the_allocation_stream_is_a_stream_of_its_own():
    first = {
        "fedra": seeds.fedra_allocation_rng(SEED, 1, 2).integers(2**63),
        "layers": seeds.layer_rng(SEED, 1, 2).integers(2**63),
        "sampling": seeds.sampling_rng(SEED, 1, 2).integers(2**63),
        "faults": seeds.fault_rng(SEED, 1, 2).integers(2**63),
    }
    assert len(set(first.values())) == len(first)
