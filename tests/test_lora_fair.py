"""LoRA-FAIR: zero-padded FedAvg of B and A, B corrected on the server towards sum p_k B_k A_k.

Every expected value is written out here with dense numpy (np.pad, the d_out x d_in products
and a matrix inverse), not with hetfed's own functions.
"""

from __future__ import annotations

import numpy as np
import pytest

from hetfed import adapter_state, wire
from hetfed.aggregation import fair_corrected_modules
from hetfed.config import RunSettings, parse_run_config
from hetfed.errors import ConfigError
from strategies.lora_fair import LoRAFAIR, LoRAFAIROptions
from strategies.registry import load_strategy
from tests.harness import MODULES, global_state, make, random_replies, train_round, trained

ALPHA = RunSettings().lora.alpha  # the harness's settings: s_k = alpha / r_k, s_g = alpha / 8


def by_definition(pairs, p, rank, lam, v=None):
    """(B_avg + dB, A_avg, dW, B_avg) from the dense formula; ``pairs`` a list of (B_k, A_k),
    ``v`` the weights of dW (default ``p``)."""
    v = p if v is None else v
    b_avg = sum(
        pk * np.pad(b.astype(np.float64), ((0, 0), (0, rank - b.shape[1])))
        for pk, (b, _) in zip(p, pairs, strict=True)
    )
    a_avg = sum(
        pk * np.pad(a.astype(np.float64), ((0, rank - a.shape[0]), (0, 0)))
        for pk, (_, a) in zip(p, pairs, strict=True)
    )
    dw = sum(vk * b.astype(np.float64) @ a for vk, (b, a) in zip(v, pairs, strict=True))
    db = (dw - b_avg @ a_avg) @ a_avg.T @ np.linalg.inv(a_avg @ a_avg.T + lam * np.eye(rank))
    return b_avg + db, a_avg, dw, b_avg


def assert_close(got, expected, rtol=1e-5):
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_global_pair_is_the_corrected_average(lam):
    """Ranks 2/4/8/4, unequal n_k, d_out = 40, d_in = 30 (A_avg has full row rank 8)."""
    rng = np.random.default_rng(0)
    n = np.array([3, 30, 300, 11])
    p = n / n.sum()
    replies = random_replies(rng, (2, 4, 8, 4), 40, 30)
    global_lora = {"m": (np.zeros((40, 8), np.float32), np.zeros((8, 30), np.float32))}
    b, a = fair_corrected_modules(replies, global_lora, p, lam)["m"]
    expected_b, expected_a, dw, b_avg = by_definition([r["m"] for r in replies], p, 8, lam)
    assert b.dtype == np.float32 and a.dtype == np.float32
    assert_close(a, expected_a)
    assert_close(b, expected_b)
    # the corrected product is closer to the ideal update than plain FedAvg's
    error = np.linalg.norm(b.astype(np.float64) @ a - dw)
    assert error < np.linalg.norm(b_avg @ expected_a - dw)
    if lam == 0:  # the normal equations of the least-squares fit hold
        residual = (b.astype(np.float64) @ a - dw) @ a.T.astype(np.float64)
        assert np.abs(residual).max() < 1e-4 * np.abs(dw @ a.T).max()


def test_one_client_needs_no_correction():
    rng = np.random.default_rng(1)
    replies = random_replies(rng, (8,), 20, 15)
    global_lora = {"m": (np.zeros((20, 8), np.float32), np.zeros((8, 15), np.float32))}
    b, a = fair_corrected_modules(replies, global_lora, [1.0], 0.01)["m"]
    np.testing.assert_allclose(b, replies[0]["m"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a, replies[0]["m"][1])


def test_indices_no_reply_holds_keep_their_global_values():
    rng = np.random.default_rng(2)
    replies = random_replies(rng, (2, 4), 20, 15)  # indices 4..7: nobody
    global_b = rng.normal(size=(20, 8)).astype(np.float32)
    global_a = rng.normal(size=(8, 15)).astype(np.float32)
    b, a = fair_corrected_modules(replies, {"m": (global_b, global_a)}, [0.3, 0.7], 0.01)["m"]
    expected_b, expected_a, *_ = by_definition([r["m"] for r in replies], [0.3, 0.7], 4, 0.01)
    assert_close(b[:, :4], expected_b)
    assert_close(a[:4], expected_a)
    np.testing.assert_array_equal(b[:, 4:], global_b[:, 4:])
    np.testing.assert_array_equal(a[4:], global_a[4:])


def converted(sent, module, scale_b):
    """Each node's (B_k, A_k) of ``module``, nodes in id order, B times ``scale_b(r_k)``."""
    pairs = []
    for node in sorted(sent):
        b, a = adapter_state.split_state(sent[node])[0][module]
        pairs.append((b.astype(np.float64) * scale_b(b.shape[1]), a))
    return pairs


def test_a_round_through_the_strategy_sends_each_client_its_truncation():
    rng = np.random.default_rng(3)
    strategy = make(LoRAFAIR, LoRAFAIROptions(correction_lambda=0.1))
    n_examples = {1000: 5, 1001: 30, 1002: 100}
    reply, sent = trained(rng, n_examples=n_examples)
    _, new = train_round(strategy, global_state(rng), reply)
    assert strategy.stats[1].replied == 3
    messages, _ = train_round(strategy, new, trained(rng)[0], server_round=2)
    p = [n_examples[n] / 135 for n in sorted(sent)]
    for module in MODULES:
        # replies at the global scaling: B_k s_k / s_g = B_k * 8 / r_k
        pairs = converted(sent, module, lambda r: 8 / r)
        expected_b, expected_a, *_ = by_definition(pairs, p, 8, 0.1)
        b, a = new[f"{module}.lora_B.weight"], new[f"{module}.lora_A.weight"]
        assert_close(b, expected_b)
        assert_close(a, expected_a)
        for msg in messages:
            config = msg.content[wire.CONFIG]
            r = int(config[wire.RANK])
            assert config[wire.LORA_SCALING] == pytest.approx(ALPHA / r)
            arrays = wire.from_record(msg.content[wire.ARRAYS])
            # the truncation, B times s_g / s_k = r / 8
            b_k = arrays[f"{module}.lora_B.weight"]
            np.testing.assert_allclose(b_k, b[:, :r] * r / 8, rtol=1e-6)
            np.testing.assert_array_equal(arrays[f"{module}.lora_A.weight"], a[:r])
    expect_head = sum(
        pk * sent[n]["classifier.bias"] for pk, n in zip(p, sorted(sent), strict=True)
    )
    np.testing.assert_allclose(new["classifier.bias"], expect_head, rtol=1e-5)


def test_unconverted_replies_weigh_the_ideal_update_by_their_scaling():
    """``lora.rescale = false``: the factors are averaged as they arrive, and dW is the mean of
    s_k B_k A_k in the global adapter's units, sum_k p_k (s_k / s_g) B_k A_k."""
    rng = np.random.default_rng(4)
    strategy = make(LoRAFAIR, None, rescale=False)
    n_examples = {1000: 5, 1001: 30, 1002: 100}
    reply, sent = trained(rng, n_examples=n_examples)
    _, new = train_round(strategy, global_state(rng), reply)
    p = np.array([n_examples[n] / 135 for n in sorted(sent)])
    ratios = np.array([8 / 2, 8 / 4, 8 / 8])  # s_k / s_g for ranks 2, 4, 8
    for module in MODULES:
        pairs = converted(sent, module, lambda r: 1.0)
        expected_b, *_ = by_definition(pairs, p, 8, 0.01, v=p * ratios)
        assert_close(new[f"{module}.lora_B.weight"], expected_b)


@pytest.mark.parametrize("lam", [-0.1, float("inf"), float("nan")])
def test_a_negative_or_infinite_lambda_is_a_config_error(lam):
    with pytest.raises(ConfigError) as err:
        config = {"strategy": "lora-fair", "lora-fair.correction-lambda": lam}
        parse_run_config(config, LoRAFAIROptions, "lora-fair")
    assert err.value.key == "lora-fair.correction-lambda"


def test_registered_with_its_default():
    assert load_strategy("lora-fair") is LoRAFAIR
    assert LoRAFAIROptions().correction_lambda == 0.01
    options = parse_run_config({"lora-fair.correction-lambda": 0}, LoRAFAIROptions, "lora-fair")[1]
    assert options.correction_lambda == 0.0  # an integer is accepted for the float
