"""FLoRA on real Flower messages: exact stacked update merged into the base, fresh LoRA."""

from __future__ import annotations

import numpy as np

from hetfed import adapter_state, wire
from hetfed.adapter_state import BASE_DELTA_SUFFIX
from hetfed.adapters import AdapterHost
from hetfed.config import RunSettings
from hetfed.models import ModelConfig, build_classifier
from hetfed.server_model import ServerModel
from strategies.flora import FLoRA
from tests.harness import D_IN, D_OUT, MODULES, PROFILES, global_state, make, train_round, trained


def client_reply(rng, **kwargs):
    """The harness's random replies, made from what a ClientApp trains and returns: the
    trainable part of what it was sent (base deltas are applied, never returned)."""
    reply, sent = trained(rng, **kwargs)
    return (lambda node, rank, arrays: reply(node, rank, adapter_state.trainable(arrays))), sent


def state_with_deltas(rng, scale=1.0):
    state = global_state(rng)
    deltas = {m: (scale * rng.normal(size=(D_OUT, D_IN))).astype(np.float32) for m in MODULES}
    return adapter_state.with_base_deltas(state, deltas)


def test_merged_update_is_the_exact_weighted_sum_of_heterogeneous_products():
    rng = np.random.default_rng(0)
    strategy = make(FLoRA, None)
    state = state_with_deltas(rng)
    n_examples = {1000: 3, 1001: 40, 1002: 200}
    reply, sent = client_reply(rng, n_examples=n_examples)
    messages, new = train_round(strategy, state, reply)
    assert strategy.stats[1].replied == 3 and strategy.stats[1].failed == 0
    for msg in messages:
        config = msg.content[wire.CONFIG]
        rank = int(config[wire.RANK])
        assert float(config[wire.LORA_ALPHA]) == 2.0 * rank  # alpha_k = 2 r_k, s_k = 2
        arrays = wire.from_record(msg.content[wire.ARRAYS])
        # clients get the merged base (the deltas) and their truncation of the global LoRA
        for module in MODULES:
            key = module + BASE_DELTA_SUFFIX
            np.testing.assert_array_equal(arrays[key], state[key])
            assert arrays[f"{module}.lora_A.weight"].shape == (rank, D_IN)
    p = {n: n_examples[n] / 243 for n in sent}
    for module in MODULES:
        expect = sum(
            p[n]
            * 2.0
            * sent[n][f"{module}.lora_B.weight"].astype(np.float64)
            @ sent[n][f"{module}.lora_A.weight"].astype(np.float64)
            for n in sent
        )
        key = module + BASE_DELTA_SUFFIX
        assert new[key].dtype == np.float32 and new[key].shape == (D_OUT, D_IN)
        got = new[key].astype(np.float64) - state[key]
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    expect_head = sum(p[n] * sent[n]["classifier.weight"] for n in sent)
    np.testing.assert_allclose(new["classifier.weight"], expect_head, rtol=1e-5)


def test_lora_restarts_fresh_and_deterministic_after_each_round():
    rng = np.random.default_rng(1)
    state = state_with_deltas(rng, scale=0.0)
    reply, _ = client_reply(rng)
    _, new = train_round(make(FLoRA, None), state, reply)
    for module in MODULES:
        b, a = new[f"{module}.lora_B.weight"], new[f"{module}.lora_A.weight"]
        assert b.shape == (D_OUT, 8) and not b.any()
        assert a.shape == (8, D_IN) and a.dtype == np.float32
        assert not np.allclose(a, state[f"{module}.lora_A.weight"])
        assert np.abs(a).max() <= 1 / np.sqrt(D_IN) and a.std() > 0.1 / np.sqrt(D_IN)
    # same seed and round: the same A; another round or seed: another A
    lora = adapter_state.split_state(new)[0]
    again = make(FLoRA, None).aggregate_lora(1, [], lora)
    later = make(FLoRA, None).aggregate_lora(2, [], lora)
    other = FLoRA(RunSettings(seed=1, min_train_nodes=1, min_available_nodes=3), PROFILES)
    for module in MODULES:
        np.testing.assert_array_equal(again[module][1], lora[module][1])
        assert not np.allclose(later[module][1], lora[module][1])
        assert not np.allclose(other.aggregate_lora(1, [], lora)[module][1], lora[module][1])


def test_replies_are_checked_against_the_trainable_part_only():
    rng = np.random.default_rng(2)
    state = state_with_deltas(rng)

    def echo_deltas(node, arrays):  # node 1002 also returns a base delta: not trainable
        if node == 1002:
            key = MODULES[0] + BASE_DELTA_SUFFIX
            arrays[key] = np.zeros((D_OUT, D_IN), np.float32)
        return arrays

    strategy = make(FLoRA, None)
    reply, sent = client_reply(rng, mutate=echo_deltas)
    _, new = train_round(strategy, state, reply)
    assert strategy.stats[1].replied == 2 and strategy.stats[1].failed == 1
    assert not any(k.endswith(BASE_DELTA_SUFFIX) for n in (1000, 1001) for k in sent[n])
    assert strategy.stats[1].bytes_down > 3 * len(MODULES) * D_OUT * D_IN * 4  # deltas go down
    assert set(new) == set(state)


def test_initial_state_carries_zero_deltas_for_every_lora_module():
    settings = RunSettings(seed=3)
    model, _ = build_classifier(ModelConfig(name="tiny-random-bert"), num_labels=3, seed=3)
    strategy = FLoRA(settings, PROFILES)
    strategy.bind(ServerModel(settings, AdapterHost(model), test=None, public=None))
    state = strategy.initial_state()
    lora = adapter_state.split_state(state)[0]
    deltas = adapter_state.base_deltas(state)
    assert lora and set(deltas) == set(lora)
    for module, (b, a) in lora.items():
        assert a.shape[0] == 8 and not b.any()
        assert deltas[module].shape == (b.shape[0], a.shape[1])
        assert deltas[module].dtype == np.float32 and not deltas[module].any()
    spec, trainable, view_deltas = strategy.model_view(state)
    assert spec.alpha == 16.0 and set(trainable) == set(adapter_state.trainable(state))
    assert set(view_deltas) == set(lora)
