"""FlexLoRA on real Flower messages: SVD of the weighted sum, best rank-r_k part per client."""

from __future__ import annotations

import contextlib
import tracemalloc

import numpy as np

from hetfed import wire
from hetfed.config import RunSettings
from hetfed.profiles import parse_profiles
from strategies.flexlora import FlexLoRA
from strategies.replies import ClientUpdate
from tests.harness import MODULES, global_state, make, train_round, trained

ALPHA = RunSettings().lora.alpha  # the harness's settings: one alpha, s_k = alpha / r_k


def best_approximation(w: np.ndarray, rank: int) -> np.ndarray:
    """Eckart-Young by a dense SVD (small sizes only)."""
    u, s, vt = np.linalg.svd(w)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def dense_sum(sent: dict, n_examples: dict, module: str) -> np.ndarray:
    """sum_k p_k s_k B_k A_k in float64."""
    total = sum(n_examples[n] for n in sent)
    w = 0
    for node, arrays in sent.items():
        b = arrays[f"{module}.lora_B.weight"].astype(np.float64)
        a = arrays[f"{module}.lora_A.weight"].astype(np.float64)
        w = w + n_examples[node] / total * (ALPHA / a.shape[0]) * (b @ a)
    return w


def assert_close(got, expect):
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())


def test_clients_get_the_best_rank_rk_approximation_of_the_weighted_sum():
    rng = np.random.default_rng(0)
    strategy = make(FlexLoRA, None)
    assert strategy.global_rank() == 8
    n_examples = {1000: 5, 1001: 30, 1002: 100}
    reply, sent = trained(rng, n_examples=n_examples)
    _, new = train_round(strategy, global_state(rng), reply)
    assert strategy.stats[1].replied == 3
    # round 2 distributes the aggregate: each node's s_k B_k A_k is the rank-r_k truncation
    messages, _ = train_round(strategy, new, trained(rng)[0], server_round=2)
    ranks = {m.metadata.dst_node_id: int(m.content[wire.CONFIG][wire.RANK]) for m in messages}
    assert ranks == {1000: 2, 1001: 4, 1002: 8}
    for module in MODULES:
        w = dense_sum(sent, n_examples, module)
        b, a = new[f"{module}.lora_B.weight"], new[f"{module}.lora_A.weight"]
        assert b.shape == (b.shape[0], 8) and a.shape[0] == 8 and b.dtype == np.float32
        assert_close(ALPHA / 8 * b.astype(np.float64) @ a, best_approximation(w, 8))
        for msg in messages:
            r = ranks[msg.metadata.dst_node_id]
            arrays = wire.from_record(msg.content[wire.ARRAYS])
            b_k = arrays[f"{module}.lora_B.weight"].astype(np.float64)
            a_k = arrays[f"{module}.lora_A.weight"].astype(np.float64)
            assert b_k.shape[1] == a_k.shape[0] == r
            assert_close(ALPHA / r * b_k @ a_k, best_approximation(w, r))
            # A_k = V^T[:r_k]: orthonormal rows
            np.testing.assert_allclose(a_k @ a_k.T, np.eye(r), atol=1e-5)
    # the head is averaged with the data weights p_k
    p = {n: n_examples[n] / 135 for n in sent}
    expect_head = sum(p[n] * sent[n]["classifier.bias"] for n in sent)
    np.testing.assert_allclose(new["classifier.bias"], expect_head, rtol=1e-5)


def test_initial_state_with_zero_b_distributes_zero_updates():
    rng = np.random.default_rng(1)
    strategy = make(FlexLoRA, None)
    state = global_state(rng)
    for module in MODULES:  # a fresh adapter: A random (not SVD-ordered), B = 0
        state[f"{module}.lora_B.weight"] = np.zeros_like(state[f"{module}.lora_B.weight"])
    for rank in (2, 4, 8):
        sent = strategy.distribute(state, rank)
        assert set(sent) == set(state)
        np.testing.assert_array_equal(sent["classifier.weight"], state["classifier.weight"])
        for module in MODULES:
            b_k, a_k = sent[f"{module}.lora_B.weight"], sent[f"{module}.lora_A.weight"]
            assert b_k.shape[1] == rank and not b_k.any() and b_k.dtype == np.float32
            np.testing.assert_array_equal(a_k, state[f"{module}.lora_A.weight"][:rank])


def test_fewer_components_than_the_global_rank_are_zero_padded():
    rng = np.random.default_rng(2)
    strategy = make(FlexLoRA, None)

    def only_rank_two(node, arrays):  # nodes 1001 and 1002 send nothing usable
        return arrays if node == 1000 else {}

    reply, sent = trained(rng, mutate=only_rank_two)
    _, new = train_round(strategy, global_state(rng), reply)
    assert strategy.stats[1].replied == 1
    for module in MODULES:
        b, a = new[f"{module}.lora_B.weight"], new[f"{module}.lora_A.weight"]
        assert b.shape[1] == a.shape[0] == 8
        assert not b[:, 2:].any() and not a[2:].any()
        assert_close(
            ALPHA / 8 * b.astype(np.float64) @ a, dense_sum({1000: sent[1000]}, {1000: 1}, module)
        )


def _updates(rng, d, ranks, scaling=1.0):
    updates = []
    for k, r in enumerate(ranks):
        state = {
            "m.lora_A.weight": rng.normal(size=(r, d)).astype(np.float32),
            "m.lora_B.weight": rng.normal(size=(d, r)).astype(np.float32),
        }
        updates.append(ClientUpdate(k, int(rng.integers(1, 100)), int(r), state, {}, scaling))
    return updates


def _one_blas_thread():
    """One BLAS thread if threadpoolctl is there: on a small shared machine a multi-threaded
    QR of 1024 x 1000 can take 10x longer than a single-threaded one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _peak_bytes(strategy, updates, global_lora):
    """The new global modules and the peak of traced allocations (numpy's buffers included)."""
    with _one_blas_thread():
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            new = strategy.aggregate_lora(1, updates, global_lora)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return new, peak


def test_aggregation_of_100_clients_at_d_1024_never_forms_dense_products():
    """100 clients, d = 1024, ranks 4..16: one dense d x d product per client would hold
    100 * d * d * 4 bytes (400 MiB); the factored SVD needs a few d x sum(r_k) arrays."""
    d = 1024
    profiles = parse_profiles(
        "tiers: {s: {rank: 4}, l: {rank: 16}}\nassignment: {by-partition: [s, l]}"
    )
    strategy = FlexLoRA(RunSettings(), profiles, None)
    rng = np.random.default_rng(3)
    updates = _updates(rng, d, rng.integers(4, 17, size=100))
    global_lora = {"m": (np.zeros((d, 16), np.float32), np.zeros((16, d), np.float32))}
    new, peak = _peak_bytes(strategy, updates, global_lora)
    assert new["m"][0].shape == (d, 16) and new["m"][1].shape == (16, d)
    # about 48 MiB measured; a quarter of what one dense product per client would hold
    assert peak < 100 * d * d * 4 / 4, f"peak {peak / 2**20:.0f} MiB"


def test_aggregation_never_forms_one_dense_matrix():
    """At d = 4096 with 8 clients (sum r_k <= 128) the peak stays below ONE d x d float32
    matrix (64 MiB), so not even the summed W_g is formed."""
    d = 4096
    profiles = parse_profiles(
        "tiers: {s: {rank: 4}, l: {rank: 16}}\nassignment: {by-partition: [s, l]}"
    )
    strategy = FlexLoRA(RunSettings(), profiles, None)
    rng = np.random.default_rng(4)
    updates = _updates(rng, d, [4, 16, 8, 12, 16, 4, 6, 16])
    global_lora = {"m": (np.zeros((d, 16), np.float32), np.zeros((16, d), np.float32))}
    _, peak = _peak_bytes(strategy, updates, global_lora)
    assert peak < d * d * 4 / 2, f"peak {peak / 2**20:.0f} MiB"
