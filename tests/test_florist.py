"""FLoRIST: SVD of the stacked factors, energy threshold, one global pair truncated per client.

Every expected value is written out here with dense numpy (the weighted sum of the products, a
full SVD, the cumulative energy scanned index by index), not with hetfed's own functions.
"""

from __future__ import annotations

import numpy as np
import pytest

from hetfed import wire
from hetfed.aggregation import thresholded_svd_modules
from hetfed.config import RunSettings, parse_run_config
from hetfed.errors import ConfigError
from strategies.florist import FLoRIST, FLoRISTOptions
from strategies.registry import load_strategy
from tests.harness import (
    MODULES,
    global_state,
    make,
    random_replies,
    sent_product,
    train_round,
    trained,
)

ALPHA = RunSettings().lora.alpha  # the harness's settings: s_k = alpha / r_k, s_g = alpha / 8
RANKS = (2, 4, 8, 4)
N_EXAMPLES = (3, 30, 300, 11)


def weighted_sum(replies, p, module="m"):
    """sum_k p_k B_k A_k, dense, float64."""
    return sum(
        pk * pairs[module][0].astype(np.float64) @ pairs[module][1].astype(np.float64)
        for pk, pairs in zip(p, replies, strict=True)
    )


def energy_rank_by_definition(s, threshold):
    """The fewest leading components whose share of sum S_i^2 reaches the threshold."""
    total = float(np.sum(s**2))
    running = 0.0
    for i, value in enumerate(s):
        running += value**2
        if running / total >= threshold:
            return i + 1
    return len(s)


def truncated(u, s, vt, rank):
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def assert_close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(("d_out", "d_in"), [(40, 30), (12, 10)], ids=["factored", "dense"])
def test_global_pair_is_the_energy_thresholded_svd_of_the_weighted_sum(d_out, d_in):
    """Ranks 2/4/8/4 (sum 18: below the width at 40 x 30, above it at 12 x 10), unequal n_k."""
    rng = np.random.default_rng(0)
    replies = random_replies(rng, RANKS, d_out, d_in)
    p = np.array(N_EXAMPLES) / sum(N_EXAMPLES)
    w = weighted_sum(replies, p)
    u, s, vt = np.linalg.svd(w)
    global_lora = {"m": (np.zeros((d_out, 8), np.float32), np.zeros((8, d_in), np.float32))}
    seen = set()
    for threshold in (0.5, 0.9, 0.99, 0.9999):
        cumulative = np.cumsum(s**2) / np.sum(s**2)
        assert np.min(np.abs(cumulative - threshold)) > 1e-6  # rounding cannot move the rank
        rank = energy_rank_by_definition(s, threshold)
        new, kept = thresholded_svd_modules(replies, global_lora, p, threshold)
        b, a = new["m"]
        assert kept == {"m": rank}
        assert b.shape == (d_out, 8) and a.shape == (8, d_in) and b.dtype == np.float32
        signal = min(rank, 8)  # p above r_max: the best rank-r_max part
        seen.add(rank < 8)
        assert_close(b.astype(np.float64) @ a, truncated(u, s, vt, signal))
        assert not b[:, signal:].any()
        # every row of A is a right singular vector of W: the kept ones, then the next ones
        np.testing.assert_allclose(a @ a.T, np.eye(8), atol=1e-5)
        np.testing.assert_allclose(np.abs(np.sum(a * vt[:8], axis=1)), np.ones(8), atol=1e-4)
    assert seen == {True, False}  # both p < r_max and p > r_max were exercised


def test_fewer_singular_vectors_than_the_global_rank_are_zero_in_both_factors():
    rng = np.random.default_rng(1)
    replies = random_replies(rng, (2, 2), 30, 20)  # W has rank 4 < r_max = 8
    global_lora = {"m": (np.ones((30, 8), np.float32), np.ones((8, 20), np.float32))}
    new, kept = thresholded_svd_modules(replies, global_lora, [0.25, 0.75], 0.5)
    b, a = new["m"]
    u, s, vt = np.linalg.svd(weighted_sum(replies, [0.25, 0.75]))
    rank = energy_rank_by_definition(s[:4], 0.5)
    assert kept == {"m": rank} and rank < 4
    assert_close(b.astype(np.float64) @ a, truncated(u, s, vt, rank))
    assert not b[:, rank:].any() and not a[4:].any()
    np.testing.assert_allclose(a[:4] @ a[:4].T, np.eye(4), atol=1e-5)


def test_a_round_through_the_strategy_sends_each_client_its_truncation():
    rng = np.random.default_rng(2)
    strategy = make(FLoRIST, FLoRISTOptions(threshold=0.85))
    n_examples = {1000: 5, 1001: 30, 1002: 100}
    reply, sent = trained(rng, n_examples=n_examples)
    _, new = train_round(strategy, global_state(rng), reply)
    assert strategy.stats[1].replied == 3
    energy_ranks = dict(strategy.energy_ranks)  # round 2 aggregates too
    messages, _ = train_round(strategy, new, trained(rng)[0], server_round=2)
    total = sum(n_examples.values())
    for module in MODULES:
        # s_g W in the clients' own units: sum_k p_k s_k B_k A_k (s_k = alpha / r_k)
        w = 0
        for n, arrays in sent.items():
            b_k = arrays[f"{module}.lora_B.weight"].astype(np.float64)
            a_k = arrays[f"{module}.lora_A.weight"].astype(np.float64)
            w = w + n_examples[n] / total * ALPHA / a_k.shape[0] * b_k @ a_k
        u, s, vt = np.linalg.svd(w)
        rank = energy_rank_by_definition(s, 0.85)
        assert energy_ranks[module] == rank and 2 < rank < 8  # r_k < p and r_k > p
        b, a = new[f"{module}.lora_B.weight"], new[f"{module}.lora_A.weight"]
        assert_close(ALPHA / 8 * b.astype(np.float64) @ a, truncated(u, s, vt, rank))
        for msg in messages:
            r, s_k, product = sent_product(msg, module)
            assert s_k == pytest.approx(ALPHA / r)
            # the truncation, B rescaled by s_g / s_k: the best rank-min(r_k, p) part
            assert_close(product, truncated(u, s, vt, min(r, rank)))
            arrays = wire.from_record(msg.content[wire.ARRAYS])
            np.testing.assert_allclose(
                arrays[f"{module}.lora_B.weight"], b[:, :r] * (ALPHA / 8) / (ALPHA / r), rtol=1e-6
            )
            np.testing.assert_array_equal(arrays[f"{module}.lora_A.weight"], a[:r])
    # the head is averaged with p_k
    expect_head = sum(n_examples[n] / total * sent[n]["classifier.bias"] for n in sent)
    np.testing.assert_allclose(new["classifier.bias"], expect_head, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5, float("nan")])
def test_a_threshold_outside_zero_one_is_a_config_error(threshold):
    with pytest.raises(ConfigError) as err:
        config = {"strategy": "florist", "florist.threshold": threshold}
        parse_run_config(config, FLoRISTOptions, "florist")
    assert err.value.key == "florist.threshold"


def test_registered_with_its_defaults_and_refuses_unconverted_scaling():
    assert load_strategy("florist") is FLoRIST
    assert FLoRISTOptions().threshold == 0.9
    with pytest.raises(ConfigError) as err:
        make(FLoRIST, None, rescale=False)
    assert err.value.key == "lora.rescale"
