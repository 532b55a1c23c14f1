"""raFLoRA: each rank partition averaged over the clients holding it, then FlexLoRA's SVD.

The expected sum is written out here one rank index at a time with dense numpy (index i of
client k weighted p_k / sum_{h: r_h > i} p_h), which is the partition rule because every client
covering a partition holds all its indices; the SVD is a full dense one.
"""

from __future__ import annotations

import numpy as np
import pytest

from hetfed import lora_algebra as la
from hetfed.aggregation import svd_modules
from hetfed.config import RunSettings, parse_run_config
from hetfed.errors import ConfigError
from hetfed.profiles import parse_profiles
from strategies.flexlora import FlexLoRA
from strategies.raflora import RaFLoRA
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
UNIFORM = parse_profiles(
    "tiers: {s: {rank: 4}, m: {rank: 4}, l: {rank: 4}}\nassignment: {by-partition: [s, m, l]}"
)


def per_index_sum(pairs, p):
    """sum_i sum_{k: r_k > i} p_k / (sum_{h: r_h > i} p_h) B_k[:, i] A_k[i, :], dense float64;
    ``pairs`` is a list of (B_k, A_k)."""
    d_out, d_in = pairs[0][0].shape[0], pairs[0][1].shape[1]
    w = np.zeros((d_out, d_in))
    for i in range(max(b.shape[1] for b, _ in pairs)):
        holders = [k for k, (b, _) in enumerate(pairs) if b.shape[1] > i]
        total = sum(p[k] for k in holders)
        for k in holders:
            b, a = pairs[k]
            w += p[k] / total * np.outer(b[:, i].astype(np.float64), a[i].astype(np.float64))
    return w


def best_approximation(w, rank):
    u, s, vt = np.linalg.svd(w)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def assert_close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(("d_out", "d_in"), [(40, 30), (12, 10)], ids=["factored", "dense"])
def test_global_pair_is_the_svd_of_the_rank_partitioned_average(d_out, d_in):
    """Ranks 2/4/8/4 with unequal n_k, the rank-8 client holding 1% of the data: partitions
    {0, 1} (all four clients), {2, 3} (three), {4..7} (one, its weight renormalised to 1)."""
    rng = np.random.default_rng(0)
    ranks, n = (2, 4, 8, 4), np.array([300, 30, 3, 11])
    p = n / n.sum()
    replies = random_replies(rng, ranks, d_out, d_in)
    global_lora = {"m": (np.zeros((d_out, 8), np.float32), np.zeros((8, d_in), np.float32))}
    b, a = svd_modules(replies, global_lora, p, svd=la.partitioned_svd)["m"]
    w = per_index_sum([r["m"] for r in replies], p)
    assert b.shape == (d_out, 8) and a.shape == (8, d_in) and b.dtype == np.float32
    assert_close(b.astype(np.float64) @ a, best_approximation(w, 8))
    np.testing.assert_allclose(a @ a.T, np.eye(8), atol=1e-5)  # A = V^T: orthonormal rows
    # not FlexLoRA's sum, where the top partition is shrunk by the rank-8 client's data share
    flex = sum(
        pk * r["m"][0].astype(np.float64) @ r["m"][1] for pk, r in zip(p, replies, strict=True)
    )
    assert np.linalg.norm(w - flex) > 0.1 * np.linalg.norm(w)


def test_fewer_components_than_the_global_rank_are_zero_padded():
    rng = np.random.default_rng(1)
    replies = random_replies(rng, (2, 4), 30, 20)  # 6 components < r_max = 8
    global_lora = {"m": (np.ones((30, 8), np.float32), np.ones((8, 20), np.float32))}
    b, a = svd_modules(replies, global_lora, [0.2, 0.8], svd=la.partitioned_svd)["m"]
    assert_close(b.astype(np.float64) @ a, per_index_sum([r["m"] for r in replies], [0.2, 0.8]))
    assert not b[:, 6:].any() and not a[6:].any()


def adapter_at_rank(state, rank):
    return {
        k: v[:rank] if k.endswith("lora_A.weight") else v[:, :rank] if "lora_B" in k else v
        for k, v in state.items()
    }


def test_with_one_rank_it_is_flexlora():
    rng = np.random.default_rng(2)
    n_examples = {1000: 5, 1001: 50, 1002: 500}
    state = global_state(rng)
    news = []
    for cls in (RaFLoRA, FlexLoRA):
        strategy = make(cls, None)
        strategy.profiles = UNIFORM  # every client rank 4, the global rank 4
        assert strategy.global_rank() == 4
        reply, _ = trained(np.random.default_rng(3), n_examples=n_examples)
        _, new = train_round(strategy, adapter_at_rank(state, 4), reply)
        news.append(new)
    for key, value in news[1].items():
        if key.endswith("lora_A.weight"):  # compare products: signs of singular vectors may differ
            module = key.removesuffix(".lora_A.weight")
            got = news[0][f"{module}.lora_B.weight"].astype(np.float64) @ news[0][key]
            expected = value.astype(np.float64)
            assert_close(got, news[1][f"{module}.lora_B.weight"].astype(np.float64) @ expected)
        elif "lora" not in key:
            np.testing.assert_allclose(news[0][key], value, rtol=1e-6)


def test_a_round_through_the_strategy_sends_each_client_its_best_rank_rk_part():
    rng = np.random.default_rng(4)
    strategy = make(RaFLoRA, None)
    n_examples = {1000: 5, 1001: 30, 1002: 100}
    reply, sent = trained(rng, n_examples=n_examples)
    _, new = train_round(strategy, global_state(rng), reply)
    assert strategy.stats[1].replied == 3
    messages, _ = train_round(strategy, new, trained(rng)[0], server_round=2)
    p = [n_examples[n] / 135 for n in sorted(sent)]
    for module in MODULES:
        # the replies converted to the global scaling: B_k s_k / s_g = B_k * 8 / r_k
        pairs = []
        for n in sorted(sent):
            b = sent[n][f"{module}.lora_B.weight"].astype(np.float64)
            pairs.append((b * 8 / b.shape[1], sent[n][f"{module}.lora_A.weight"]))
        w = per_index_sum(pairs, p)  # the global adapter's units: s_g B A = s_g W_r_max
        b, a = new[f"{module}.lora_B.weight"], new[f"{module}.lora_A.weight"]
        assert_close(b.astype(np.float64) @ a, best_approximation(w, 8))
        for msg in messages:
            r, s_k, product = sent_product(msg, module)
            assert s_k == pytest.approx(ALPHA / r)
            assert_close(product, ALPHA / 8 * best_approximation(w, r))
    expect_head = sum(
        pk * sent[n]["classifier.bias"] for pk, n in zip(p, sorted(sent), strict=True)
    )
    np.testing.assert_allclose(new["classifier.bias"], expect_head, rtol=1e-5)


def test_registered_without_options_and_refuses_unconverted_scaling():
    assert load_strategy("raflora") is RaFLoRA and RaFLoRA.options_class is None
    with pytest.raises(ConfigError) as err:
        make(RaFLoRA, None, rescale=False)
    assert err.value.key == "lora.rescale"
    with pytest.raises(ConfigError) as err:  # it has no options: any raflora.* key is unknown
        parse_run_config({"strategy": "raflora", "raflora.threshold": 0.9}, None, "raflora")
    assert err.value.key == "raflora.threshold"
