"""Zero-padding, RBLA and HeLoRA-Pad on real Flower messages with explicit client replies.

Every expected aggregate is built here from its definition (np.pad, explicit loops over rank
indices, the fillers written out), not with hetfed.lora_algebra, so the tests check the algebra
and not just that the strategy calls it.
"""

from __future__ import annotations

import numpy as np
import pytest

from hetfed import adapter_state, wire
from hetfed.config import parse_run_config
from hetfed.errors import ConfigError
from hetfed.profiles import parse_profiles
from strategies.fedit import FedIT, FedITOptions
from strategies.helora_pad import HeLoRAPad, HeLoRAPadOptions
from strategies.rbla import RBLA
from strategies.registry import load_strategy
from strategies.zeropad import ZeroPad
from tests.harness import MODULES, global_state, make, train_round, trained

N_EXAMPLES = {1000: 5, 1001: 50, 1002: 500}  # ranks 2, 4, 8 in the harness profiles
RANKS = {1000: 2, 1001: 4, 1002: 8}
UNIFORM = parse_profiles(
    "tiers: {s: {rank: 4}, m: {rank: 4}, l: {rank: 4}}\nassignment: {by-partition: [s, m, l]}"
)
FILLERS = ("zero", "mean", "linear", "adjacent")


def uniform_rank(strategy):
    """The same strategy on profiles whose three tiers all have rank 4."""
    strategy.profiles = UNIFORM
    return strategy


def pairs_of(sent):
    """Each node's reply as {module: (B, A)}, nodes in id order."""
    return {n: adapter_state.split_state(sent[n])[0] for n in sorted(sent)}


def pad_by_definition(b, a, rank, filler):
    """methods.md's fillers, written out: new columns of B, new rows of A up to ``rank``."""
    extra = rank - b.shape[1]
    b, a = b.astype(np.float64), a.astype(np.float64)
    if filler == "zero":
        new_b, new_a = np.zeros((b.shape[0], extra)), np.zeros((extra, a.shape[1]))
    elif filler == "mean":
        new_b, new_a = (
            np.full((b.shape[0], extra), b.mean()),
            np.full((extra, a.shape[1]), a.mean()),
        )
    elif filler == "linear":
        new_b = np.tile(b.mean(axis=1, keepdims=True), (1, extra))
        new_a = np.tile(a.mean(axis=0, keepdims=True), (extra, 1))
    else:  # adjacent
        new_b, new_a = np.tile(b[:, -1:], (1, extra)), np.tile(a[-1:, :], (extra, 1))
    return np.hstack([b, new_b]), np.vstack([a, new_a])


def per_index_loop(pairs, weights, module, rank):
    """RBLA by definition: index i averaged over {k : r_k > i}, weights renormalised there."""
    b0, a0 = next(iter(pairs.values()))[module]
    b, a = np.zeros((b0.shape[0], rank)), np.zeros((rank, a0.shape[1]))
    for i in range(rank):
        holders = [n for n in pairs if pairs[n][module][0].shape[1] > i]
        total = sum(weights[n] for n in holders)
        for n in holders:
            b[:, i] += weights[n] / total * pairs[n][module][0][:, i]
            a[i, :] += weights[n] / total * pairs[n][module][1][i, :]
    return b, a


def assert_module(new, module, b, a, **tol):
    tol = tol or {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(new[f"{module}.lora_B.weight"], b, **tol)
    np.testing.assert_allclose(new[f"{module}.lora_A.weight"], a, **tol)


def keep_only(nodes):
    """A reply mutation that empties the replies of the other nodes, so they are rejected."""
    return lambda node, arrays: arrays if node in nodes else {}


# ------------------------------------------------------------------------------------ zeropad


def test_zeropad_sends_truncations_and_averages_zero_padded_factors_with_p_k():
    rng = np.random.default_rng(10)
    state = global_state(rng)
    strategy = make(ZeroPad, None, rescale=False)
    reply, sent = trained(rng, n_examples=N_EXAMPLES)
    messages, new = train_round(strategy, state, reply)
    for msg in messages:
        r = int(msg.content[wire.CONFIG][wire.RANK])
        assert r == RANKS[msg.metadata.dst_node_id]
        arrays = wire.from_record(msg.content[wire.ARRAYS])
        for m in MODULES:
            np.testing.assert_array_equal(
                arrays[f"{m}.lora_B.weight"], state[f"{m}.lora_B.weight"][:, :r]
            )
            np.testing.assert_array_equal(
                arrays[f"{m}.lora_A.weight"], state[f"{m}.lora_A.weight"][:r]
            )
    pairs = pairs_of(sent)
    p = {n: N_EXAMPLES[n] / 555 for n in pairs}
    for m in MODULES:
        padded = {n: pad_by_definition(*pairs[n][m], 8, "zero") for n in pairs}
        expect_b = sum(p[n] * padded[n][0] for n in pairs)
        expect_a = sum(p[n] * padded[n][1] for n in pairs)
        assert_module(new, m, expect_b, expect_a)
    expect_head = sum(p[n] * sent[n]["classifier.weight"] for n in pairs)
    np.testing.assert_allclose(new["classifier.weight"], expect_head, rtol=1e-5)


# --------------------------------------------------------------------------------------- rbla


def uniform_round(strategy, seed):
    """One round of ``strategy`` at rank 4 from the global state and the replies drawn from
    ``seed`` (the same for every strategy given the same seed); the new global state."""
    rng = np.random.default_rng(seed)  # the same global state and replies for each strategy
    state = global_state(rng, rank=4)
    reply, _ = trained(rng, n_examples=N_EXAMPLES)
    messages, new = train_round(strategy, state, reply)
    assert {int(m.content[wire.CONFIG][wire.RANK]) for m in messages} == {4}
    return new


def test_rbla_equals_zero_padding_when_every_rank_is_the_same():
    rbla, zeropad = (uniform_round(uniform_rank(make(cls, None)), 11) for cls in (RBLA, ZeroPad))
    assert rbla.keys() == zeropad.keys()
    for key in rbla:
        np.testing.assert_allclose(rbla[key], zeropad[key], rtol=1e-6, atol=1e-7)


def test_rbla_averages_each_rank_index_over_the_clients_that_hold_it():
    rng = np.random.default_rng(12)
    state = global_state(rng)
    strategy = make(RBLA, None, rescale=False)
    n_examples = {1000: 3, 1001: 30, 1002: 300}
    reply, sent = trained(rng, n_examples=n_examples)
    _, new = train_round(strategy, state, reply)
    pairs = pairs_of(sent)
    for m in MODULES:
        assert_module(new, m, *per_index_loop(pairs, n_examples, m, 8))
    # index 0 mixes all three clients, index 7 is node 1002's alone
    b7 = new[f"{MODULES[0]}.lora_B.weight"][:, 7]
    np.testing.assert_allclose(b7, pairs[1002][MODULES[0]][0][:, 7], rtol=1e-6)


def test_rbla_keeps_global_values_of_indices_no_reply_holds():
    rng = np.random.default_rng(13)
    state = global_state(rng)
    strategy = make(RBLA, None, rescale=False)
    reply, sent = trained(rng, n_examples=N_EXAMPLES, mutate=keep_only({1000, 1001}))
    _, new = train_round(strategy, state, reply)
    assert strategy.stats[1].replied == 2
    pairs = {n: p for n, p in pairs_of(sent).items() if n in (1000, 1001)}
    for m in MODULES:
        b, a = per_index_loop(pairs, N_EXAMPLES, m, 4)
        b_new, a_new = new[f"{m}.lora_B.weight"], new[f"{m}.lora_A.weight"]
        np.testing.assert_allclose(b_new[:, :4], b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a_new[:4], a, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(b_new[:, 4:], state[f"{m}.lora_B.weight"][:, 4:])
        np.testing.assert_array_equal(a_new[4:], state[f"{m}.lora_A.weight"][4:])


# --------------------------------------------------------------------------------- helora-pad


def test_helora_pad_zero_filler_with_uniform_ranks_equals_fedit():
    helora, fedit = (
        uniform_round(strategy, 14)
        for strategy in (
            uniform_rank(make(HeLoRAPad, HeLoRAPadOptions(filler="zero"))),
            make(FedIT, FedITOptions(rank=4)),
        )
    )
    assert helora.keys() == fedit.keys()
    for key in helora:
        np.testing.assert_allclose(helora[key], fedit[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("filler", FILLERS)
@pytest.mark.parametrize("node", [1000, 1001])
def test_helora_pad_single_client_aggregate_is_its_padded_reply(filler, node):
    rng = np.random.default_rng(15)
    state = global_state(rng)
    strategy = make(HeLoRAPad, HeLoRAPadOptions(filler=filler), rescale=False)
    reply, sent = trained(rng, n_examples=N_EXAMPLES, mutate=keep_only({node}))
    _, new = train_round(strategy, state, reply)
    assert strategy.stats[1].replied == 1
    r = RANKS[node]
    for m in MODULES:
        b, a = adapter_state.split_state(sent[node])[0][m]
        b_new, a_new = new[f"{m}.lora_B.weight"], new[f"{m}.lora_A.weight"]
        assert b_new.shape == (b.shape[0], 8) and a_new.shape == (8, a.shape[1])
        np.testing.assert_allclose(b_new[:, :r], b, rtol=1e-6)
        np.testing.assert_allclose(a_new[:r], a, rtol=1e-6)
        pad_b, pad_a = b_new[:, r:], a_new[r:]
        for j in range(8 - r):  # every padded column / row, by the filler's own definition
            if filler == "zero":
                column, row = np.zeros(b.shape[0]), np.zeros(a.shape[1])
            elif filler == "mean":
                column, row = np.full(b.shape[0], b.mean()), np.full(a.shape[1], a.mean())
            elif filler == "linear":
                column, row = b.mean(axis=1), a.mean(axis=0)
            else:
                column, row = b[:, r - 1], a[r - 1]
            np.testing.assert_allclose(pad_b[:, j], column, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(pad_a[j], row, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("filler", FILLERS)
def test_helora_pad_rank_weighted_sum_of_padded_factors(filler):
    rng = np.random.default_rng(16)
    state = global_state(rng)
    strategy = make(HeLoRAPad, HeLoRAPadOptions(filler=filler), rescale=False)
    reply, sent = trained(rng, n_examples=N_EXAMPLES)
    _, new = train_round(strategy, state, reply)
    pairs = pairs_of(sent)
    nr = {n: N_EXAMPLES[n] * RANKS[n] for n in pairs}  # 10, 200, 4000
    w = {n: nr[n] / sum(nr.values()) for n in pairs}
    for m in MODULES:
        padded = {n: pad_by_definition(*pairs[n][m], 8, filler) for n in pairs}
        expect_b = sum(w[n] * padded[n][0] for n in pairs)
        expect_a = sum(w[n] * padded[n][1] for n in pairs)
        assert_module(new, m, expect_b, expect_a)
    # the head keeps the data weights p_k, not n_k r_k
    p = {n: N_EXAMPLES[n] / 555 for n in pairs}
    expect_head = sum(p[n] * sent[n]["classifier.bias"] for n in pairs)
    np.testing.assert_allclose(new["classifier.bias"], expect_head, rtol=1e-5)


def test_helora_pad_default_is_linear_filler_rank_weighted():
    options = HeLoRAPadOptions()
    assert (options.filler, options.aggregation) == ("linear", "rank-weighted")
    assert load_strategy("helora-pad") is HeLoRAPad
    assert load_strategy("zeropad") is ZeroPad and ZeroPad.options_class is None
    assert load_strategy("rbla") is RBLA and RBLA.options_class is None


def test_helora_pad_per_rank_index_equals_explicit_loop():
    rng = np.random.default_rng(17)
    state = global_state(rng)
    strategy = make(HeLoRAPad, HeLoRAPadOptions(aggregation="per-rank-index"), rescale=False)
    reply, sent = trained(rng, n_examples=N_EXAMPLES)
    _, new = train_round(strategy, state, reply)
    pairs = pairs_of(sent)
    for m in MODULES:
        assert_module(new, m, *per_index_loop(pairs, N_EXAMPLES, m, 8))


@pytest.mark.parametrize("filler", ["zero", "mean", "adjacent"])
def test_a_filler_with_per_rank_index_is_a_config_error(filler):
    with pytest.raises(ConfigError) as err:
        HeLoRAPadOptions(filler=filler, aggregation="per-rank-index")
    assert err.value.key == "helora-pad.filler" and err.value.value == filler
    assert "not used" in str(err.value) and "per-rank-index" in str(err.value)
    # the same through the run config, as the ServerApp reads it
    run_config = {"helora-pad.filler": filler, "helora-pad.aggregation": "per-rank-index"}
    with pytest.raises(ConfigError, match="helora-pad.filler"):
        parse_run_config(run_config, HeLoRAPadOptions, options_prefix="helora-pad")


@pytest.mark.parametrize(
    ("key", "value"),
    [("helora-pad.filler", "cubic"), ("helora-pad.aggregation", "fedavg")],
)
def test_option_errors_name_the_key_and_value(key, value):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value}, HeLoRAPadOptions, options_prefix="helora-pad")
    assert err.value.key == key and err.value.value == value
    assert key in str(err.value) and repr(value) in str(err.value)
