"""Fed-HeLLo (GD-HLA, RGD-HLA, FIM-HLA) on real Flower messages; FIM-HLA on a tiny model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from hetfed import adapter_state, wire
from hetfed.config import LoraSettings, RunSettings, parse_run_config
from hetfed.data_config import DataConfig
from hetfed.errors import ConfigError
from hetfed.layer_allocation import fisher_probabilities, pattern_probabilities
from hetfed.models import ModelConfig
from hetfed.profiles import parse_profiles
from hetfed.server_model import ServerModel
from strategies.fim_hla import FIMHLA, FIMHLAOptions
from strategies.gd_hla import GDHLA, GDHLAOptions
from strategies.rgd_hla import RGDHLA, RGDHLAOptions
from tests import harness
from tests.conftest import COMMON, TOPICS
from tests.harness import (
    MODULES,
    InProcessGrid,
    global_state,
    sent_layers,
    sparsity_weighted_padding,
    topic_server,
)


def profiles(tiers: dict[str, tuple[int, int | None]]):
    """Profiles with tiers name -> (rank, layers or None for all)."""
    lines = ["tiers:"]
    for name, (rank, layers) in tiers.items():
        extra = f", layers: {layers}" if layers is not None else ""
        lines.append(f"  {name}: {{rank: {rank}{extra}}}")
    return parse_profiles("\n".join(lines))


def make(cls, options, tiers, grid_tiers, num_layers, **settings):
    prof = profiles(tiers)
    kwargs = dict(min_train_nodes=1, min_available_nodes=len(grid_tiers), seed=5) | settings
    strategy = cls(RunSettings(**kwargs), prof, options, num_layers)
    return strategy, InProcessGrid(grid_tiers, prof)


def train_round(strategy, grid, state, reply_fn, server_round=1):
    """configure_train -> ``reply_fn(node, rank, arrays, layers)`` -> aggregate_train."""
    return harness.train_round(strategy, state, reply_fn, server_round, grid, with_layers=True)


def trained(rng, n_examples=None, rank_override=None, extra_layers=False):
    """Replies with random arrays of the sent shapes, only for the sent layers (plus the head);
    ``extra_layers`` returns every layer instead (a reply the server must reject)."""
    sent = {}

    def reply(node, rank, arrays, layers):
        r = rank_override(node, rank) if rank_override else rank
        new = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in arrays.items()}
        new = adapter_state.truncate_state(new, r)
        if layers is not None and not extra_layers:
            new = adapter_state.restrict_to_layers(new, layers)
        sent[node] = new
        examples = n_examples[node] if n_examples else 10
        metrics = MetricRecord({wire.NUM_EXAMPLES: examples, wire.RANK: r, wire.TRAIN_LOSS: 1.0})
        return RecordDict({wire.ARRAYS: wire.to_record(new), wire.METRICS: metrics})

    return reply, sent


def lora_key(module, factor):
    return f"{module}.lora_{factor}.weight"


# ------------------------------------------------------------------------------ allocation

GD_TIERS = {"a": (4, 1), "b": (4, 2), "c": (4, 3), "full": (4, None)}
GD_NODES = ("a", "a", "a", "b", "b", "b", "c", "c", "full", "full")  # budgets 1,1,1,2,2,2,3,3,6,6


@pytest.mark.parametrize("pattern", ["uniform", "triangle", "inverted-triangle", "bottleneck"])
def test_gd_hla_per_layer_counts_follow_the_pattern_and_stay_fixed(pattern):
    strategy, grid = make(GDHLA, GDHLAOptions(pattern=pattern), GD_TIERS, GD_NODES, 6)
    state = global_state(np.random.default_rng(0), 4, [f"layer.{i}.query" for i in range(6)])
    allocations = []
    for server_round in (1, 2):
        messages = strategy.configure_train(
            server_round, wire.to_record(state), ConfigRecord(), grid
        )
        allocations.append({m.metadata.dst_node_id: sent_layers(m) for m in messages})
    assert allocations[0] == allocations[1]  # the same allocation every round
    budgets = {1000 + i: strategy.layer_budget(1000 + i) or 6 for i in range(len(GD_NODES))}
    counts = np.zeros(6)
    for node, layers in allocations[0].items():
        layers = layers if layers is not None else list(range(6))
        assert len(set(layers)) == len(layers) == budgets[node]
        counts[layers] += 1
    assert allocations[0][1008] is None and allocations[0][1009] is None  # full budgets
    targets = pattern_probabilities(pattern, 6) * sum(budgets.values())
    assert np.all(np.abs(counts - targets) < 1), (counts, targets)


def successive_inclusion(p, k):
    """P(layer l among k draws without replacement, each with prob. ∝ p among the rest)."""
    inclusion = np.zeros(len(p))
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for layer in order:
            prob *= p[layer] / left
            left -= p[layer]
        inclusion[list(order)] += prob
    return inclusion


def test_rgd_hla_draws_follow_the_pattern_and_are_reproducible():
    tiers = {"one": (4, 1), "two": (4, 2), "full": (4, None)}
    strategy, grid = make(RGDHLA, RGDHLAOptions(pattern="inverted-triangle"), tiers, tiers, 4)
    state = global_state(np.random.default_rng(1), 4, [f"layer.{i}.query" for i in range(4)])
    messages = strategy.configure_train(1, wire.to_record(state), ConfigRecord(), grid)
    first = {m.metadata.dst_node_id: sent_layers(m) for m in messages}
    assert first[1002] is None  # a full budget trains every layer
    p = pattern_probabilities("inverted-triangle", 4)
    np.testing.assert_allclose(p, [0.1, 0.2, 0.3, 0.4])
    rounds = 2000
    for node, budget in ((1000, 1), (1001, 2)):
        draws = [strategy.client_layers(r, node) for r in range(1, rounds + 1)]
        assert draws[0] == first[node]
        assert all(len(set(d)) == len(d) == budget and d == sorted(d) for d in draws)
        frequency = np.bincount(np.concatenate(draws), minlength=4) / rounds
        expected = p if budget == 1 else successive_inclusion(p, 2)
        # binomial standard deviation <= 0.012 at 2000 rounds: 0.04 is > 3.5 sigma
        np.testing.assert_allclose(frequency, expected, atol=0.04)
    # reproducible: a fresh strategy with the same seed draws the same layers
    again, _ = make(RGDHLA, RGDHLAOptions(pattern="inverted-triangle"), tiers, tiers, 4)
    again.configure_train(1, wire.to_record(state), ConfigRecord(), grid)
    assert [again.client_layers(r, 1001) for r in range(1, 50)] == [
        strategy.client_layers(r, 1001) for r in range(1, 50)
    ]


# ------------------------------------------------------------------------------ aggregation

AGG_TIERS = {"one": (4, 1)}
AGG_MODULES = ("layer.0.query", "layer.0.value", "layer.1.query", "layer.2.query")


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_layers_are_averaged_over_exactly_their_clients_and_untrained_ones_kept(weighting):
    rng = np.random.default_rng(2)
    options = GDHLAOptions(pattern="triangle", weighting=weighting)
    strategy, grid = make(GDHLA, options, AGG_TIERS, ("one",) * 3, 3)
    state = global_state(rng, 4, AGG_MODULES)
    n = {1000: 3, 1001: 10, 1002: 37}
    reply, sent = trained(rng, n_examples=n)
    messages, new = train_round(strategy, grid, state, reply)
    layers = {m.metadata.dst_node_id: sent_layers(m) for m in messages}
    # every client gets every module, and returns only its layer (p = 1/2, 1/3, 1/6: 2, 1, 0)
    for msg in messages:
        assert set(wire.from_record(msg.content[wire.ARRAYS])) == set(state)
    trainers = {layer: [k for k in sorted(layers) if layer in layers[k]] for layer in range(3)}
    assert [len(trainers[layer]) for layer in range(3)] == [2, 1, 0]
    for module in AGG_MODULES:
        clients = trainers[adapter_state.layer_of(module)]
        for factor in "AB":
            key = lora_key(module, factor)
            assert all((key in sent[k]) == (k in clients) for k in sent)
            if not clients:
                assert np.array_equal(new[key], state[key])  # untouched, bit for bit
                continue
            w = np.array([n[k] if weighting == "examples" else 1.0 for k in clients])
            expect = sum(wk * sent[k][key] for wk, k in zip(w / w.sum(), clients, strict=True))
            np.testing.assert_allclose(new[key], expect, rtol=1e-5, atol=1e-6)
    # the head: every replier, data weights p_k
    total = sum(n.values())
    expect_head = sum(n[k] / total * sent[k]["classifier.bias"] for k in sent)
    np.testing.assert_allclose(new["classifier.bias"], expect_head, rtol=1e-5)


@pytest.mark.parametrize("fault", ["extra-layers", "missing-layer"])
def test_replies_with_other_layers_than_assigned_are_rejected(fault):
    rng = np.random.default_rng(3)
    strategy, grid = make(RGDHLA, RGDHLAOptions(), AGG_TIERS, ("one",) * 3, 3)
    state = global_state(rng, 4, AGG_MODULES)
    good, sent = trained(rng)

    def reply(node, rank, arrays, layers):
        if node != 1001:
            return good(node, rank, arrays, layers)
        other = [(layers[0] + 1) % 3]  # a layer it was not assigned
        new = {k: np.ones_like(v) for k, v in arrays.items()}
        new = adapter_state.restrict_to_layers(
            new, layers + other if fault == "extra-layers" else other
        )
        metrics = MetricRecord({wire.NUM_EXAMPLES: 10, wire.RANK: rank, wire.TRAIN_LOSS: 1.0})
        return RecordDict({wire.ARRAYS: wire.to_record(new), wire.METRICS: metrics})

    _, new = train_round(strategy, grid, state, reply)
    assert strategy.stats[1].replied == 2 and strategy.stats[1].failed == 1
    for key, value in new.items():
        assert not np.any(value == 1.0), key  # nothing of the rejected reply was used
        contributors = [k for k in sent if key in sent[k]]
        if not contributors:
            assert np.array_equal(value, state[key])


def test_full_budget_only_trains_only_the_clients_with_every_layer():
    rng = np.random.default_rng(4)
    tiers = {"s": (2, 1), "m": (4, 1), "l": (8, None)}
    strategy, grid = make(GDHLA, GDHLAOptions(full_budget_only=True), tiers, tiers, 2)
    assert strategy.global_rank() == 2  # ranks = uniform: one rank, the smallest tier's
    state = global_state(rng, 2, MODULES)
    reply, sent = trained(rng)
    messages, new = train_round(strategy, grid, state, reply)
    assert [m.metadata.dst_node_id for m in messages] == [1002]
    assert (
        sent_layers(messages[0]) is None and int(messages[0].content[wire.CONFIG][wire.RANK]) == 2
    )
    for key in new:
        np.testing.assert_allclose(new[key], sent[1002][key], rtol=1e-6)
    # without the option the partial-budget nodes train too
    everyone, grid = make(GDHLA, GDHLAOptions(), tiers, tiers, 2)
    messages = everyone.configure_train(1, wire.to_record(state), ConfigRecord(), grid)
    assert [len(sent_layers(m) or [0, 1]) for m in messages] == [1, 1, 2]


def test_hetlora_ranks_truncate_per_tier_and_aggregate_per_layer_by_sparsity():
    rng = np.random.default_rng(5)
    tiers = {"s": (2, 1), "m": (4, 1), "l": (8, None)}
    options = RGDHLAOptions(ranks="hetlora", pattern="uniform")
    strategy, grid = make(RGDHLA, options, tiers, tiers, 2, lora=LoraSettings(rescale=False))
    assert strategy.global_rank() == 8
    state = global_state(rng, 8, MODULES)
    # the rank-8 node prunes to 7 (HetLoRA's floor(0.99 * 8)); the server accepts and keeps it
    reply, sent = trained(rng, rank_override=lambda node, r: 7 if r == 8 else r)
    messages, new = train_round(strategy, grid, state, reply)
    ranks = {m.metadata.dst_node_id: int(m.content[wire.CONFIG][wire.RANK]) for m in messages}
    assert ranks == {1000: 2, 1001: 4, 1002: 8}
    assert strategy.stats[1].replied == 3 and strategy.client_rank(1002) == 7
    layers = {}
    for msg in messages:
        node = msg.metadata.dst_node_id
        layers[node] = sent_layers(msg) or [0, 1]
        arrays = wire.from_record(msg.content[wire.ARRAYS])
        assert float(msg.content[wire.CONFIG][wire.PRUNE_GAMMA]) == 0.99
        for key in (lora_key(MODULES[0], "A"), lora_key(MODULES[2], "A")):
            np.testing.assert_array_equal(arrays[key], state[key][: ranks[node]])
        assert set(sent[node]) == set(adapter_state.restrict_to_layers(state, layers[node]))
    assert len(layers[1000]) == len(layers[1001]) == 1
    for layer in (0, 1):
        modules = [m for m in MODULES if adapter_state.layer_of(m) == layer]
        clients = [k for k in sorted(sent) if layer in layers[k]]
        pairs = [adapter_state.split_state(sent[k])[0] for k in clients]
        for m, (expect_b, expect_a) in sparsity_weighted_padding(pairs, modules).items():
            np.testing.assert_allclose(new[lora_key(m, "B")], expect_b, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(new[lora_key(m, "A")], expect_a, rtol=1e-5, atol=1e-6)
    # round 2: node 1002 gets its pruned rank
    messages, _ = train_round(strategy, grid, new, trained(rng)[0], server_round=2)
    assert {int(m.content[wire.CONFIG][wire.RANK]) for m in messages} == {2, 4, 7}


def test_options_are_run_config_keys_and_are_validated():
    flat = {"strategy": "gd-hla", "gd-hla.pattern": "triangle", "gd-hla.full-budget-only": True}
    _, options = parse_run_config(flat, GDHLAOptions, "gd-hla")
    assert options == GDHLAOptions(pattern="triangle", full_budget_only=True)
    flat = {"strategy": "fim-hla", "fim-hla.first-round": 3, "fim-hla.weighting": "examples"}
    _, options = parse_run_config(flat, FIMHLAOptions, "fim-hla")
    assert (options.first_round, options.period, options.weighting) == (3, 50, "examples")
    bad = [
        (GDHLAOptions, {"pattern": "diamond"}, "gd-hla.pattern"),
        (RGDHLAOptions, {"weighting": "sparsity"}, "rgd-hla.weighting"),
        (RGDHLAOptions, {"ranks": "hetlora", "rank": 4}, "rgd-hla.rank"),
        (FIMHLAOptions, {"period": 0}, "fim-hla.period"),
        (FIMHLAOptions, {"initial_pattern": "x"}, "fim-hla.initial-pattern"),
    ]
    for cls, kwargs, key in bad:
        with pytest.raises(ConfigError) as err:
            cls(**kwargs)
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        FIMHLA(RunSettings(data=DataConfig(server_examples=99)), profiles(AGG_TIERS), None, 3)
    assert err.value.key == "data.server-examples"


# ------------------------------------------------------------------------------ FIM-HLA

MODEL = ModelConfig(name="tiny-random-bert", max_length=16)
EXAMPLES = 6


def topic_texts(rng, n):
    names = sorted(TOPICS)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(len(names)))
        words = TOPICS[names[label]].split() + COMMON
        texts.append(" ".join(words[i] for i in rng.integers(len(words), size=10)))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def server() -> ServerModel:
    settings = RunSettings(model=MODEL, data=DataConfig(server_examples=EXAMPLES + 4))
    return topic_server(MODEL, settings, topic_texts, EXAMPLES + 4, 8)


def reference_scores(server, spec, state):
    """s_l recomputed independently: one backward pass per example, .grad of each parameter."""
    with server.host.lock:
        model = server.load(spec, state)
        model.eval()
        params = {
            n: p for n, p in model.named_parameters() if "lora_" in n and f".{spec.name}." in n
        }
        squares = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        for i in range(EXAMPLES):
            model.zero_grad()
            logits = model(
                input_ids=server.public.input_ids[i : i + 1],
                attention_mask=server.public.attention_mask[i : i + 1],
            )
            logits[0, server.public.labels[i]].backward()
            for n, p in params.items():
                squares[n] += p.grad.double() ** 2
        model.zero_grad()
    scores = np.zeros(2)
    for n, total in squares.items():
        scores[adapter_state.layer_of(n)] += float(torch.linalg.norm(total / EXAMPLES))
    return scores


def test_fim_hla_recomputes_fisher_probabilities_on_schedule(server):
    tiers = {"s": (2, 1), "m": (4, 1), "l": (8, None)}
    options = FIMHLAOptions(first_round=2, period=2, examples=EXAMPLES)
    strategy, grid = make(
        FIMHLA, options, tiers, tiers, 2, model=MODEL, data=DataConfig(server_examples=16)
    )
    strategy.bind(server)
    spec = strategy.global_spec()
    assert spec.rank == 2  # ranks = uniform: the smallest tier rank
    rng = np.random.default_rng(6)
    state = strategy.initial_state()
    state = {k: (0.2 * rng.normal(size=v.shape)).astype(np.float32) for k, v in state.items()}
    initial = pattern_probabilities("bottleneck", 2)
    history = []
    for server_round in range(1, 6):
        if server_round == 4:  # a different global adapter: layer 1's B is scaled up
            state = {
                k: v * (5.0 if "layer.1." in k and "lora_B" in k else 1.0) for k, v in state.items()
            }
        messages = strategy.configure_train(
            server_round, wire.to_record(state), ConfigRecord(), grid
        )
        history.append((list(strategy.fisher_rounds), strategy.layer_probabilities.copy()))
        for msg in messages:  # the draws use the current probabilities
            node, layers = msg.metadata.dst_node_id, sent_layers(msg)
            if node != 1002:
                assert layers == strategy.sample(
                    server_round, node, 1, strategy.layer_probabilities
                )
        if server_round in (2, 4):  # computed now, from this round's global adapter
            scores = reference_scores(server, spec, state)
            np.testing.assert_allclose(strategy.layer_scores, scores, rtol=1e-4)
            p = strategy.layer_probabilities
            np.testing.assert_allclose(p, fisher_probabilities(scores))
            assert np.argmax(p) == np.argmax(scores) and p.max() > p.min()
    assert [h[0] for h in history] == [[], [2], [2], [2, 4], [2, 4]]
    np.testing.assert_array_equal(history[0][1], initial)  # before the first: the pattern
    np.testing.assert_array_equal(history[1][1], history[2][1])  # round 3 reuses round 2's
    np.testing.assert_array_equal(history[3][1], history[4][1])
