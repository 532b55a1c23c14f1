"""FedEx-LoRA on real Flower messages: FedAvg of A and B plus the exact residual in the base."""

from __future__ import annotations

import numpy as np
import pytest

from hetfed import adapter_state, wire
from hetfed import lora_algebra as la
from hetfed.adapter_state import BASE_DELTA_SUFFIX
from hetfed.config import LoraSettings, RunSettings, parse_run_config
from hetfed.errors import ConfigError
from hetfed.models import ModelConfig
from server_apps.lora_server import merged_adapter
from strategies.fedex_lora import FedExLoRA, FedExLoRAOptions
from tests.harness import D_IN, D_OUT, MODULES, PROFILES, global_state, make, train_round, trained

R_MAX = 8
N_EXAMPLES = {1000: 3, 1001: 40, 1002: 200}  # ranks 2, 4, 8


def client_reply(rng, **kwargs):
    """Random replies of the trainable part of what a client was sent (deltas never return)."""
    reply, sent = trained(rng, **kwargs)
    return (lambda node, rank, arrays: reply(node, rank, adapter_state.trainable(arrays))), sent


def f64(x):
    return np.asarray(x, dtype=np.float64)


def b_key(module):
    return f"{module}.lora_B.weight"


def a_key(module):
    return f"{module}.lora_A.weight"


def d_key(module):
    return module + BASE_DELTA_SUFFIX


def effective(state, module, scaling):
    """delta + s B A of one module of a state (delta 0 where it has none)."""
    delta = f64(state.get(d_key(module), np.zeros((D_OUT, D_IN))))
    return delta + scaling * f64(state[b_key(module)]) @ f64(state[a_key(module)])


def pad(m, rank, axis):
    width = [(0, 0), (0, 0)]
    width[axis] = (0, rank - m.shape[axis])
    return np.pad(f64(m), width)


def client_scalings(messages):
    return {
        m.metadata.dst_node_id: float(m.content[wire.CONFIG][wire.LORA_SCALING]) for m in messages
    }


@pytest.mark.parametrize(
    "weighting, rescale", [("examples", True), ("uniform", True), ("examples", False)]
)
def test_two_rounds_move_the_model_by_exactly_the_weighted_sum_of_client_products(
    weighting, rescale
):
    rng = np.random.default_rng(0)
    strategy = make(FedExLoRA, FedExLoRAOptions(weighting=weighting), rescale=rescale)
    s_g = 16.0 / R_MAX  # lora.alpha 16, the global rank 8, standard scaling
    state = global_state(rng)  # round 1 starts without deltas
    total = sum(N_EXAMPLES.values())
    for server_round in (1, 2):
        reply, sent = client_reply(rng, n_examples=N_EXAMPLES)
        messages, new = train_round(strategy, state, reply, server_round=server_round)
        assert strategy.stats[server_round].replied == 3
        s = client_scalings(messages)
        p = {n: (N_EXAMPLES[n] / total if weighting == "examples" else 1 / 3) for n in sent}
        for msg in messages:  # what each client is sent: its truncation and the deltas
            node, arrays = msg.metadata.dst_node_id, wire.from_record(msg.content[wire.ARRAYS])
            rank = int(msg.content[wire.CONFIG][wire.RANK])
            assert rank == {1000: 2, 1001: 4, 1002: 8}[node] and s[node] == 16.0 / rank
            convert = s_g / s[node] if rescale else 1.0
            for module in MODULES:
                np.testing.assert_array_equal(arrays[a_key(module)], state[a_key(module)][:rank])
                np.testing.assert_allclose(
                    arrays[b_key(module)], state[b_key(module)][:, :rank] * convert, rtol=1e-6
                )
                if server_round == 1:
                    assert d_key(module) not in arrays  # no residual yet
                else:
                    np.testing.assert_array_equal(arrays[d_key(module)], state[d_key(module)])
        for module in MODULES:
            # the factors: p_k-averages of the replies (B at the global scaling), zero-padded
            back = {n: (s[n] / s_g if rescale else 1.0) for n in sent}
            b = sum(p[n] * pad(sent[n][b_key(module)] * back[n], R_MAX, 1) for n in sent)
            a = sum(p[n] * pad(sent[n][a_key(module)], R_MAX, 0) for n in sent)
            np.testing.assert_allclose(new[b_key(module)], b, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(new[a_key(module)], a, rtol=1e-5, atol=1e-6)
            # exact: delta' + s_g B' A' = delta + sum_k p_k s_k B_k A_k (each at its own scaling)
            update = sum(
                p[n] * s[n] * f64(sent[n][b_key(module)]) @ f64(sent[n][a_key(module)])
                for n in sent
            )
            old_delta = f64(state.get(d_key(module), np.zeros((D_OUT, D_IN))))
            assert new[d_key(module)].dtype == np.float32
            np.testing.assert_allclose(
                effective(new, module, s_g), old_delta + update, rtol=1e-5, atol=1e-5
            )
        head = sum(N_EXAMPLES[n] / total * f64(sent[n]["classifier.weight"]) for n in sent)
        np.testing.assert_allclose(new["classifier.weight"], head, rtol=1e-5)  # p_k always
        state = new


def test_fold_tail_starts_every_client_at_the_global_model_and_averages_the_models():
    rng = np.random.default_rng(1)
    strategy = make(FedExLoRA, FedExLoRAOptions(fold_tail=True))
    s_g = 16.0 / R_MAX
    state = global_state(rng)
    deltas = {m: rng.normal(size=(D_OUT, D_IN)).astype(np.float32) for m in MODULES}
    state = adapter_state.with_base_deltas(state, deltas)
    reply, sent = client_reply(rng, n_examples=N_EXAMPLES)
    messages, new = train_round(strategy, state, reply)
    s = client_scalings(messages)
    received = {m.metadata.dst_node_id: wire.from_record(m.content[wire.ARRAYS]) for m in messages}
    total = sum(N_EXAMPLES.values())
    for module in MODULES:
        start = effective(state, module, s_g)
        for node, arrays in received.items():  # delta_k + s_k B_k A_k = delta + s_g B A
            np.testing.assert_allclose(effective(arrays, module, s[node]), start, atol=1e-5)
        np.testing.assert_array_equal(received[1002][d_key(module)], state[d_key(module)])
        # the new model is the exact p_k-average of the clients' trained models
        models = {
            n: f64(received[n][d_key(module)])
            + s[n] * f64(sent[n][b_key(module)]) @ f64(sent[n][a_key(module)])
            for n in sent
        }
        average = sum(N_EXAMPLES[n] / total * models[n] for n in sent)
        np.testing.assert_allclose(effective(new, module, s_g), average, rtol=1e-5, atol=1e-5)


def test_the_exported_adapter_is_the_global_model():
    rng = np.random.default_rng(2)
    strategy = make(FedExLoRA, None)
    reply, _ = client_reply(rng, n_examples=N_EXAMPLES)
    _, new = train_round(strategy, global_state(rng), reply)
    spec, state = merged_adapter(*strategy.model_view(new))
    assert spec.scaling == 1.0 and spec.rank <= min(D_OUT, D_IN)
    for module in MODULES:
        product = f64(state[b_key(module)]) @ f64(state[a_key(module)])
        np.testing.assert_allclose(product, effective(new, module, 16.0 / R_MAX), atol=1e-5)


def test_add_exact_residual_against_the_formula():
    rng = np.random.default_rng(3)
    bs = [rng.normal(size=(D_OUT, r)) for r in (2, 4, 8)]
    as_ = [rng.normal(size=(r, D_IN)) for r in (2, 4, 8)]
    w = [0.1, 0.5, 1.7]
    b, a = rng.normal(size=(D_OUT, 8)), rng.normal(size=(8, D_IN))
    c = rng.normal(size=(D_OUT, D_IN))
    expect = sum(wk * bk @ ak for wk, bk, ak in zip(w, bs, as_, strict=True)) - 2.5 * b @ a
    np.testing.assert_allclose(la.add_exact_residual(c, bs, as_, w, b, a, 2.5), c + expect)
    np.testing.assert_allclose(la.add_exact_residual(None, bs, as_, w, b, a, 2.5), expect)
    with pytest.raises(ValueError, match="scaling"):
        la.add_exact_residual(c, bs, as_, w, b, a, -1.0)
    with pytest.raises(ValueError, match="d_out"):
        la.add_exact_residual(c, bs, as_, w, b[1:], a, 1.0)


def test_options_are_run_config_keys_and_are_validated():
    flat = {"strategy": "fedex-lora", "fedex-lora.weighting": "uniform", "fedex-lora.fold-tail": 1}
    with pytest.raises(ConfigError):  # a bool option takes a bool
        parse_run_config(flat, FedExLoRAOptions, "fedex-lora")
    flat["fedex-lora.fold-tail"] = True
    _, options = parse_run_config(flat, FedExLoRAOptions, "fedex-lora")
    assert options == FedExLoRAOptions(weighting="uniform", fold_tail=True)
    with pytest.raises(ConfigError) as err:
        FedExLoRAOptions(weighting="sparsity")
    assert err.value.key == "fedex-lora.weighting"
    with pytest.raises(ConfigError) as err:
        make(FedExLoRA, FedExLoRAOptions(fold_tail=True), rescale=False)
    assert err.value.key == "fedex-lora.fold-tail"
    settings = RunSettings(model=ModelConfig(quantize="4bit"), lora=LoraSettings())
    with pytest.raises(ConfigError) as err:
        FedExLoRA(settings, PROFILES)
    assert err.value.key == "model.quantize"
