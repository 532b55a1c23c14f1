"""Property tests for hetfed.lora_algebra: every function against an explicit dense construction."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetfed import lora_algebra as la

SEEDS = [0, 1, 2, 3, 4]
FAST = settings(max_examples=60, deadline=None)


def _pair(rng: np.random.Generator, d_out: int, r: int, d_in: int, dtype=np.float64):
    b = rng.standard_normal((d_out, r)).astype(dtype)
    a = rng.standard_normal((r, d_in)).astype(dtype)
    return b, a


def _pair_and_padding(shape, filler):
    """A random pair of a hypothesis ``pair_shapes`` draw and its padding to r + extra."""
    d_out, r, d_in, extra, seed = shape
    b, a = _pair(np.random.default_rng(seed), d_out, r, d_in)
    return shape, (b, a), la.pad(b, a, r + extra, filler)


def _clients(rng: np.random.Generator, d_out: int, d_in: int, ranks, dtype=np.float64):
    bs, as_ = [], []
    for r in ranks:
        b, a = _pair(rng, d_out, int(r), d_in, dtype)
        bs.append(b)
        as_.append(a)
    weights = rng.random(len(ranks)) + 0.1
    return bs, as_, weights


def _dense(bs, as_, weights) -> np.ndarray:
    """sum_k w_k B_k A_k, formed densely in float64 (the reference)."""
    return sum(
        w * (b.astype(np.float64) @ a.astype(np.float64))
        for w, b, a in zip(weights, bs, as_, strict=True)
    )


def _rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


pair_shapes = st.tuples(
    st.integers(1, 8),  # d_out
    st.integers(1, 6),  # r
    st.integers(1, 8),  # d_in
    st.integers(0, 5),  # extra rank when padding
    st.integers(0, 2**32 - 1),  # seed
)


# ---------------------------------------------------------------------------- normalize_weights


@pytest.mark.parametrize("seed", SEEDS)
def test_normalize_weights_sums_to_one_and_keeps_ratios(seed):
    w = np.random.default_rng(seed).random(7) * 10
    w[2] = 0.0  # a zero weight is allowed as long as the sum is positive
    p = la.normalize_weights(list(w))
    assert p.dtype == np.float64
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(p * w.sum(), w, rtol=1e-12)
    assert p[2] == 0.0


@pytest.mark.parametrize(
    "weights",
    [[], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0], [[1.0, 2.0]], "ab"],
    ids=["empty", "negative", "all-zero", "nan", "inf", "2-d", "string"],
)
def test_normalize_weights_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        la.normalize_weights(weights)


# ------------------------------------------------------------------------------ truncate / pad


@FAST
@given(pair_shapes, st.sampled_from(la.FILLERS))
def test_truncate_of_pad_is_identity(shape, filler):
    (d_out, r, d_in, extra, _), (b, a), (pb, pa) = _pair_and_padding(shape, filler)
    assert pb.shape == (d_out, r + extra) and pa.shape == (r + extra, d_in)
    tb, ta = la.truncate(pb, pa, r)
    np.testing.assert_array_equal(tb, b)
    np.testing.assert_array_equal(ta, a)


@FAST
@given(pair_shapes)
def test_zero_pad_of_truncate_restores_leading_block(shape):
    d_out, r, d_in, extra, seed = shape
    full = r + extra
    b, a = _pair(np.random.default_rng(seed), d_out, full, d_in)
    tb, ta = la.truncate(b, a, r)
    pb, pa = la.pad(tb, ta, full, "zero")
    np.testing.assert_array_equal(pb[:, :r], b[:, :r])
    np.testing.assert_array_equal(pa[:r, :], a[:r, :])
    assert not pb[:, r:].any() and not pa[r:, :].any()


def test_truncate_returns_copies_and_keeps_dtype():
    b, a = _pair(np.random.default_rng(0), 5, 4, 3, np.float32)
    tb, ta = la.truncate(b, a, 2)
    assert tb.dtype == np.float32 and ta.dtype == np.float32
    tb[:] = 7.0
    ta[:] = 7.0
    assert not np.any(b == 7.0) and not np.any(a == 7.0)
    # equal rank: copies as well
    sb, sa = la.truncate(b, a, 4)
    assert not np.shares_memory(sb, b) and not np.shares_memory(sa, a)


def _explicit_pad(b: np.ndarray, a: np.ndarray, rank: int, filler: str):
    """The fillers' definitions, written element by element. A's new rows are defined as B's new
    columns are, on A's transpose: 'mean' the mean of all of A, 'linear' the column-wise mean of
    A's rows, 'adjacent' A's last row."""
    return _explicit_columns(b, rank, filler), _explicit_columns(a.T, rank, filler).T


def _explicit_columns(b: np.ndarray, rank: int, filler: str) -> np.ndarray:
    """B (d_out x r) with columns r..rank-1 filled, element by element."""
    d_out, r = b.shape
    pb = np.zeros((d_out, rank))
    pb[:, :r] = b
    for j in range(r, rank):
        for i in range(d_out):
            if filler == "mean":
                pb[i, j] = sum(b[p, q] for p in range(d_out) for q in range(r)) / (d_out * r)
            elif filler == "linear":  # row-wise mean of B's columns
                pb[i, j] = sum(b[i, q] for q in range(r)) / r
            elif filler == "adjacent":  # B's last column
                pb[i, j] = b[i, r - 1]
    return pb


@FAST
@given(pair_shapes, st.sampled_from(la.FILLERS))
def test_each_filler_matches_its_definition(shape, filler):
    (d_out, r, d_in, extra, _), (b, a), (pb, pa) = _pair_and_padding(shape, filler)
    eb, ea = _explicit_pad(b, a, r + extra, filler)
    np.testing.assert_allclose(pb, eb, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pa, ea, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("filler", la.FILLERS)
def test_fillers_differ_and_keep_float32(filler):
    b, a = _pair(np.random.default_rng(5), 6, 3, 4, np.float32)
    pb, pa = la.pad(b, a, 5, filler)
    assert pb.dtype == np.float32 and pa.dtype == np.float32
    eb, ea = _explicit_pad(b.astype(np.float64), a.astype(np.float64), 5, filler)
    np.testing.assert_allclose(pb, eb, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pa, ea, rtol=1e-6, atol=1e-6)
    # the new entries are what distinguishes the fillers: none of them collapses to another
    others = [f for f in la.FILLERS if f != filler]
    for other in others:
        ob, oa = la.pad(b, a, 5, other)
        assert not (np.array_equal(ob, pb) and np.array_equal(oa, pa)), (filler, other)


@pytest.mark.parametrize("seed", SEEDS)
def test_zero_padding_leaves_product_unchanged(seed):
    rng = np.random.default_rng(seed)
    b, a = _pair(rng, 9, int(rng.integers(1, 5)), 7)
    pb, pa = la.pad(b, a, 8, "zero")
    np.testing.assert_allclose(pb @ pa, b @ a, rtol=1e-12, atol=1e-12)


def test_pad_to_equal_rank_returns_copies():
    b, a = _pair(np.random.default_rng(0), 4, 3, 5)
    for filler in la.FILLERS:
        pb, pa = la.pad(b, a, 3, filler)
        np.testing.assert_array_equal(pb, b)
        np.testing.assert_array_equal(pa, a)
        assert not np.shares_memory(pb, b) and not np.shares_memory(pa, a)


# ------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_product_frobenius_norm_matches_dense(seed, dtype):
    rng = np.random.default_rng(seed)
    d_out, r, d_in = (int(x) for x in rng.integers(1, 40, size=3))
    b, a = _pair(rng, d_out, r, d_in, dtype)
    expected = np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64))
    got = la.product_frobenius_norm(b, a)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-6)


def test_product_frobenius_norm_of_zero_product_is_zero():
    b = np.ones((4, 2))
    a = np.zeros((2, 3))
    assert la.product_frobenius_norm(b, a) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_tail_norm_product_matches_definition(seed):
    rng = np.random.default_rng(seed)
    r = int(rng.integers(1, 8))
    b, a = _pair(rng, 11, r, 6)
    for keep in range(r + 1):
        tail_b = np.sqrt(sum(b[i, j] ** 2 for i in range(11) for j in range(keep, r)))
        tail_a = np.sqrt(sum(a[i, j] ** 2 for i in range(keep, r) for j in range(6)))
        assert la.tail_norm_product(b, a, keep) == pytest.approx(tail_b * tail_a, rel=1e-12)
    assert la.tail_norm_product(b, a, r) == 0.0
    full = np.linalg.norm(b) * np.linalg.norm(a)
    assert la.tail_norm_product(b, a, 0) == pytest.approx(full, rel=1e-12)


# ------------------------------------------------------------------------------- weighted_sum


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_weighted_sum_uses_weights_as_given(seed, dtype):
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal((5, 3)).astype(dtype) for _ in range(4)]
    weights = [2.0, 0.0, 3.5, 1.0]  # deliberately not normalised
    got = la.weighted_sum(mats, weights)
    assert got.dtype == dtype and got.shape == (5, 3)
    expected = 2.0 * mats[0] + 3.5 * mats[2] + 1.0 * mats[3]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


# -------------------------------------------------------------------------------------- stack


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_stack_product_is_exact_weighted_sum(seed, dtype):
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, 9, size=6)  # heterogeneous ranks
    bs, as_, w = _clients(rng, 17, 13, ranks, dtype)
    b_s, a_s = la.stack(bs, as_, w)
    assert b_s.dtype == dtype and a_s.dtype == dtype
    assert b_s.shape == (17, ranks.sum()) and a_s.shape == (ranks.sum(), 13)
    assert _rel_err(b_s.astype(np.float64) @ a_s.astype(np.float64), _dense(bs, as_, w)) < 1e-5
    # B_s is the plain concatenation, the weights sit on the A side
    np.testing.assert_array_equal(b_s[:, : ranks[0]], bs[0])
    np.testing.assert_allclose(a_s[: ranks[0]], w[0] * as_[0], rtol=1e-6)


# ------------------------------------------------------------------------ factored_svd (FlexLoRA)


@pytest.mark.parametrize("seed", SEEDS)
def test_factored_svd_matches_dense_svd_and_best_low_rank(seed):
    rng = np.random.default_rng(seed)
    d_out, d_in = 30, 20
    ranks = rng.integers(1, 5, size=5)
    bs, as_, w = _clients(rng, d_out, d_in, ranks)
    dense = _dense(bs, as_, w)
    u_d, s_d, vt_d = np.linalg.svd(dense, full_matrices=False)
    full = min(d_out, d_in, int(ranks.sum()))

    u, s, vt = la.factored_svd(bs, as_, w, rank=full)
    assert u.shape == (d_out, full) and s.shape == (full,) and vt.shape == (full, d_in)
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, s_d[:full], rtol=1e-9, atol=1e-9 * s_d[0])
    np.testing.assert_allclose(u.T @ u, np.eye(full), atol=1e-10)
    np.testing.assert_allclose(vt @ vt.T, np.eye(full), atol=1e-10)

    # full rank reproduces W exactly; each rank-r truncation is the dense Eckart-Young optimum
    scaling = float(rng.uniform(0.5, 4.0))
    b_full, a_full = la.svd_factors(u, s, vt, rank=full, scaling=scaling)
    assert _rel_err(scaling * b_full @ a_full, dense) < 1e-10
    for r in range(1, full + 1):
        b_r, a_r = la.svd_factors(u, s, vt, rank=r, scaling=scaling)
        assert b_r.shape == (d_out, r) and a_r.shape == (r, d_in)
        best = (u_d[:, :r] * s_d[:r]) @ vt_d[:r]
        assert np.linalg.norm(scaling * b_r @ a_r - best) <= 1e-6 * np.linalg.norm(dense)

    # asking for fewer triplets gives the leading ones
    u3, s3, vt3 = la.factored_svd(bs, as_, w, rank=3)
    np.testing.assert_allclose(s3, s[:3], rtol=1e-12)
    np.testing.assert_allclose((u3 * s3) @ vt3, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-10)


def test_factored_svd_weights_are_used_as_given():
    rng = np.random.default_rng(7)
    bs, as_, w = _clients(rng, 12, 9, [2, 3, 1])
    _, s1, _ = la.factored_svd(bs, as_, w, rank=5)
    _, s3, _ = la.factored_svd(bs, as_, 3.0 * w, rank=5)
    np.testing.assert_allclose(s3, 3.0 * s1, rtol=1e-10)


def test_factored_svd_when_sum_of_ranks_exceeds_dimensions():
    rng = np.random.default_rng(3)
    bs, as_, w = _clients(rng, 6, 5, [4, 3, 4, 2])  # sum r = 13 > d_out, d_in
    dense = _dense(bs, as_, w)
    u, s, vt = la.factored_svd(bs, as_, w, rank=5)
    np.testing.assert_allclose(s, np.linalg.svd(dense, compute_uv=False), rtol=1e-9)
    assert _rel_err((u * s) @ vt, dense) < 1e-10
    with pytest.raises(ValueError, match="rank 6"):
        la.factored_svd(bs, as_, w, rank=6)


def test_factored_svd_keeps_float32():
    rng = np.random.default_rng(11)
    bs, as_, w = _clients(rng, 30, 20, [1, 2, 3, 4, 2], np.float32)
    u, s, vt = la.factored_svd(bs, as_, w, rank=4)
    assert u.dtype == s.dtype == vt.dtype == np.float32
    s_d = np.linalg.svd(_dense(bs, as_, w), compute_uv=False)
    np.testing.assert_allclose(s, s_d[:4], rtol=1e-5)
    b, a = la.svd_factors(u, s, vt, rank=2, scaling=2.0)
    assert b.dtype == a.dtype == np.float32


def _peak_bytes(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def test_factored_svd_never_forms_the_dense_matrix():
    # sum r_k (about 100) << d: a dense d x d float64 matrix (8 MiB) would exceed the bound alone.
    rng = np.random.default_rng(0)
    d = 1024
    ranks = rng.integers(4, 17, size=10)
    bs, as_, w = _clients(rng, d, d, ranks)
    (u, s, vt), peak = _peak_bytes(lambda: la.factored_svd(bs, as_, w, rank=16))
    assert peak < d * d * 8, f"peak {peak / 2**20:.1f} MiB >= one dense {d}x{d} float64"
    assert u.shape == (d, 16) and vt.shape == (16, d)


def test_factored_svd_at_scale_is_linear_in_the_sum_of_ranks():
    # The brief's size: d = 1024, 100 clients, ranks 4..16. Here sum r_k (~1000) is about d, so
    # the O((d_out + d_in) R) factors are themselves ~d^2 in size; the bound checks the O() claim
    # and the result is verified without a dense matrix.
    rng = np.random.default_rng(1)
    d_out = d_in = 1024
    ranks = rng.integers(4, 17, size=100)
    total = int(ranks.sum())
    bs, as_, w = _clients(rng, d_out, d_in, ranks)
    full = min(d_out, d_in, total)
    (u, s, vt), peak = _peak_bytes(lambda: la.factored_svd(bs, as_, w, rank=full))
    assert peak < 5 * (d_out + d_in) * total * 8
    # (u_i, s_i, v_i) are singular triplets of W: W v_i = s_i u_i, computed from the factors
    w_vt = sum(wk * (b @ (a @ vt[:32].T)) for wk, b, a in zip(w, bs, as_, strict=True))
    np.testing.assert_allclose(w_vt, u[:, :32] * s[:32], atol=1e-8 * s[0])
    # and they are all of them: sum s_i^2 = ||W||_F^2 = trace((P^T P)(Q Q^T)), no dense W
    b_s, a_s = la.stack(bs, as_, w)
    frob_sq = np.sum((b_s.T @ b_s) * (a_s @ a_s.T))
    assert np.sum(s.astype(np.float64) ** 2) == pytest.approx(frob_sq, rel=1e-9)
    assert np.all(np.diff(s) <= 0)


# ---------------------------------------------------------------------- RBLA per-rank-index avg


@pytest.mark.parametrize("seed", SEEDS)
def test_average_per_rank_index_equal_ranks_is_fedavg(seed):
    rng = np.random.default_rng(seed)
    bs, as_, w = _clients(rng, 8, 6, [3] * 4)
    gb, ga = la.average_per_rank_index(bs, as_, w, rank=5)
    p = la.normalize_weights(w)
    pbs, pas = zip(*(la.pad(b, a, 5, "zero") for b, a in zip(bs, as_, strict=True)), strict=True)
    np.testing.assert_allclose(gb, la.weighted_sum(pbs, p), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ga, la.weighted_sum(pas, p), rtol=1e-12, atol=1e-12)
    assert not gb[:, 3:].any() and not ga[3:].any()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_average_per_rank_index_mixed_ranks(seed, dtype):
    rng = np.random.default_rng(seed)
    ranks = [int(r) for r in rng.integers(1, 7, size=5)]
    rank = max(ranks) + 2
    bs, as_, w = _clients(rng, 9, 7, ranks, dtype)
    gb, ga = la.average_per_rank_index(bs, as_, w, rank=rank)
    assert gb.shape == (9, rank) and ga.shape == (rank, 7)
    assert gb.dtype == dtype and ga.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for i in range(rank):
        holders = [k for k, r in enumerate(ranks) if r > i]
        if not holders:
            assert not gb[:, i].any() and not ga[i].any()
            continue
        total = sum(w[k] for k in holders)
        exp_b = sum(w[k] / total * bs[k][:, i].astype(np.float64) for k in holders)
        exp_a = sum(w[k] / total * as_[k][i].astype(np.float64) for k in holders)
        np.testing.assert_allclose(gb[:, i], exp_b, rtol=tol, atol=tol)
        np.testing.assert_allclose(ga[i], exp_a, rtol=tol, atol=tol)
    # renormalised within each subset, so the weights' scale does not matter
    gb2, ga2 = la.average_per_rank_index(bs, as_, 10.0 * w, rank=rank)
    np.testing.assert_allclose(gb2, gb, rtol=tol, atol=tol)
    np.testing.assert_allclose(ga2, ga, rtol=tol, atol=tol)


def test_average_per_rank_index_zero_weight_holders_give_zero():
    rng = np.random.default_rng(0)
    bs, as_, _ = _clients(rng, 4, 3, [1, 3])
    gb, ga = la.average_per_rank_index(bs, as_, [1.0, 0.0], rank=3)
    np.testing.assert_allclose(gb[:, 0], bs[0][:, 0])
    assert not gb[:, 1:].any() and not ga[1:].any()


# ---------------------------------------------------------------------------------- bad input

_RNG = np.random.default_rng(123)
B, A = _pair(_RNG, 6, 3, 5)
B2, A2 = _pair(_RNG, 6, 2, 5)
U, S, VT = np.linalg.svd(B @ A, full_matrices=False)
U, S, VT = U[:, :3], S[:3], VT[:3]

BAD_CALLS = {
    # truncate
    "truncate rank 0": (lambda: la.truncate(B, A, 0), "rank 0"),
    "truncate rank > r": (lambda: la.truncate(B, A, 4), "rank 4"),
    "truncate float rank": (lambda: la.truncate(B, A, 2.0), "integer"),
    "truncate bool rank": (lambda: la.truncate(B, A, True), "integer"),
    "truncate shape mismatch": (lambda: la.truncate(B, A2, 1), "share the rank"),
    "truncate 1-d": (lambda: la.truncate(B[:, 0], A, 1), "2-D"),
    "truncate complex": (lambda: la.truncate(B + 0j, A, 1), "real"),
    "truncate rank-0 pair": (lambda: la.truncate(B[:, :0], A[:0], 1), "rank"),
    # pad
    "pad shrink": (lambda: la.pad(B, A, 2), "rank 2"),
    "pad unknown filler": (lambda: la.pad(B, A, 5, "gaussian"), "gaussian"),
    "pad shape mismatch": (lambda: la.pad(B2, A, 5), "share the rank"),
    "pad float rank": (lambda: la.pad(B, A, 4.5), "integer"),
    # norms
    "frobenius mismatch": (lambda: la.product_frobenius_norm(B, A2), "share the rank"),
    "tail keep -1": (lambda: la.tail_norm_product(B, A, -1), "keep -1"),
    "tail keep > r": (lambda: la.tail_norm_product(B, A, 4), "keep 4"),
    "tail mismatch": (lambda: la.tail_norm_product(B2, A, 1), "share the rank"),
    # weighted_sum
    "wsum empty": (lambda: la.weighted_sum([], []), "empty"),
    "wsum shape": (lambda: la.weighted_sum([B, B2], [1, 1]), "shape"),
    "wsum count": (lambda: la.weighted_sum([B, B], [1.0]), "one weight per client"),
    "wsum negative": (lambda: la.weighted_sum([B, B], [1.0, -1.0]), "non-negative"),
    "wsum all zero": (lambda: la.weighted_sum([B, B], [0.0, 0.0]), "positive sum"),
    "wsum nan": (lambda: la.weighted_sum([B, B], [1.0, float("nan")]), "finite"),
    # stack
    "stack empty": (lambda: la.stack([], [], []), "empty"),
    "stack count": (lambda: la.stack([B, B2], [A], [1, 1]), "must match"),
    "stack d_out": (lambda: la.stack([B, B[:4]], [A, A], [1, 1]), "d_out"),
    "stack d_in": (lambda: la.stack([B, B], [A, A[:, :4]], [1, 1]), "d_in"),
    "stack pair": (lambda: la.stack([B, B2], [A, A], [1, 1]), "share the rank"),
    "stack weights": (lambda: la.stack([B, B2], [A, A2], [1, -2]), "non-negative"),
    # factored_svd
    "fsvd rank 0": (lambda: la.factored_svd([B, B2], [A, A2], [1, 1], 0), "rank 0"),
    "fsvd rank > min": (lambda: la.factored_svd([B, B2], [A, A2], [1, 1], 6), "rank 6"),
    "fsvd rank > sum r": (lambda: la.factored_svd([B], [A], [1], 4), "sum of ranks=3"),
    "fsvd zero weights": (lambda: la.factored_svd([B], [A], [0], 1), "positive sum"),
    "fsvd empty": (lambda: la.factored_svd([], [], [], 1), "empty"),
    "fsvd d_in": (lambda: la.factored_svd([B, B], [A, A[:, :2]], [1, 1], 1), "d_in"),
    # svd_factors
    "svdf rank 0": (lambda: la.svd_factors(U, S, VT, 0), "rank 0"),
    "svdf rank > k": (lambda: la.svd_factors(U, S, VT, 4), "rank 4"),
    "svdf scaling 0": (lambda: la.svd_factors(U, S, VT, 1, 0.0), "positive"),
    "svdf scaling neg": (lambda: la.svd_factors(U, S, VT, 1, -2.0), "positive"),
    "svdf scaling nan": (lambda: la.svd_factors(U, S, VT, 1, float("nan")), "finite"),
    "svdf shapes": (lambda: la.svd_factors(U, S[:2], VT, 1), "fit together"),
    "svdf ascending s": (lambda: la.svd_factors(U, S[::-1], VT, 1), "non-increasing"),
    "svdf 2-d s": (lambda: la.svd_factors(U, np.diag(S), VT, 1), "1-D"),
    # average_per_rank_index
    "rbla rank < max": (lambda: la.average_per_rank_index([B, B2], [A, A2], [1, 1], 2), "rank 2"),
    "rbla empty": (lambda: la.average_per_rank_index([], [], [], 3), "empty"),
    "rbla weights": (lambda: la.average_per_rank_index([B], [A], [-1], 3), "non-negative"),
    "rbla d_out": (lambda: la.average_per_rank_index([B, B[:2]], [A, A], [1, 1], 3), "d_out"),
    "rbla count": (lambda: la.average_per_rank_index([B], [A], [1, 1], 3), "one weight"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_input_raises_value_error(case):
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------- padded_sum, add_stacked_product (issue 17)


@FAST
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=6),  # client ranks
    st.integers(0, 3),  # global rank above the largest
    st.sampled_from(la.FILLERS),
    st.integers(0, 2**32 - 1),
)
def test_padded_sum_is_the_weighted_sum_of_padded_copies(ranks, extra, filler, seed):
    rng = np.random.default_rng(seed)
    bs, as_, w = _clients(rng, 7, 5, ranks)
    rank = max(ranks) + extra
    got_b, got_a = la.padded_sum(bs, as_, w, rank, filler)
    padded = [la.pad(b, a, rank, filler) for b, a in zip(bs, as_, strict=True)]
    np.testing.assert_allclose(got_b, la.weighted_sum([b for b, _ in padded], w), atol=1e-12)
    np.testing.assert_allclose(got_a, la.weighted_sum([a for _, a in padded], w), atol=1e-12)


def test_padded_sum_keeps_float32_and_copies_nothing_it_returns():
    rng = np.random.default_rng(0)
    bs, as_, w = _clients(rng, 9, 6, [3, 3, 1], np.float32)
    b, a = la.padded_sum(bs, as_, w, 4)
    assert b.dtype == a.dtype == np.float32 and b.shape == (9, 4) and a.shape == (4, 6)
    assert not any(np.shares_memory(b, x) for x in bs) and not any(
        np.shares_memory(a, y) for y in as_
    )
    expected = w[0] * bs[0].astype(np.float64) + w[1] * bs[1]
    np.testing.assert_allclose(b[:, 1:3], expected[:, 1:3], rtol=1e-5, atol=1e-6)


def test_padded_sum_of_mixed_dtypes_and_strided_replies():
    rng = np.random.default_rng(1)
    bs, as_, w = _clients(rng, 8, 7, [2, 3, 3])
    bs[0] = np.asfortranarray(bs[0])  # not C-ordered: added by numpy, not BLAS
    as_[1] = as_[1].astype(np.float32)  # float32 next to float64: summed in float64
    bs[2] = (10 * bs[2]).astype(np.int64)  # integers: float64
    b, a = la.padded_sum(bs, as_, w, 4)
    assert b.dtype == a.dtype == np.float64
    padded = [
        la.pad(x.astype(np.float64), y.astype(np.float64), 4) for x, y in zip(bs, as_, strict=True)
    ]
    np.testing.assert_allclose(b, la.weighted_sum([x for x, _ in padded], w), atol=1e-12)
    np.testing.assert_allclose(a, la.weighted_sum([y for _, y in padded], w), atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_add_stacked_product_adds_the_weighted_products(seed, dtype):
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, 9, size=6)
    bs, as_, w = _clients(rng, 17, 13, ranks, dtype)
    c = rng.standard_normal((17, 13)).astype(dtype)
    before = c.copy()
    got = la.add_stacked_product(c, bs, as_, w)
    assert got.dtype == dtype and got.shape == (17, 13)
    np.testing.assert_array_equal(c, before)  # C itself is not modified
    assert _rel_err(got, c + _dense(bs, as_, w)) < (1e-12 if dtype == np.float64 else 1e-5)


def test_factored_svd_dense_route_wide_and_tall_matches_the_full_svd():
    rng = np.random.default_rng(8)
    for d_out, d_in in ((9, 30), (30, 9)):  # sum r = 20 >= 9: W is formed, Gram of the 9 side
        bs, as_, w = _clients(rng, d_out, d_in, [4, 6, 5, 5])
        dense = _dense(bs, as_, w)
        u_d, s_d, vt_d = np.linalg.svd(dense, full_matrices=False)
        u, s, vt = la.factored_svd(bs, as_, w, rank=5)
        np.testing.assert_allclose(s, s_d[:5], rtol=1e-10)
        np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-12)
        np.testing.assert_allclose(vt @ vt.T, np.eye(5), atol=1e-12)
        best = (u_d[:, :5] * s_d[:5]) @ vt_d[:5]
        assert _rel_err((u * s) @ vt, best) < 1e-10


def test_factored_svd_dense_route_of_a_low_rank_sum_keeps_unit_vectors():
    """W of rank 1 (and W = 0): the components past its rank are zero, their vectors still
    orthonormal, so B = U S is zero there and A = V^T keeps orthonormal rows."""
    rng = np.random.default_rng(9)
    b, a = _pair(rng, 8, 1, 6)
    for scale in (1.0, 0.0):
        bs = [scale * np.hstack([b, np.zeros((8, 3))])] * 3  # sum r = 12 >= 6: dense route
        as_ = [np.vstack([a, rng.standard_normal((3, 6))])] * 3
        u, s, vt = la.factored_svd(bs, as_, [0.2, 0.3, 0.5], rank=4)
        assert np.all(np.isfinite(u)) and np.all(np.isfinite(vt))
        np.testing.assert_allclose(s[1:], 0.0, atol=1e-7 * max(s[0], 1.0))
        np.testing.assert_allclose(s[0], scale * np.linalg.norm(b @ a), rtol=1e-10)
        np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-10)
        np.testing.assert_allclose(vt @ vt.T, np.eye(4), atol=1e-10)
        assert _rel_err((u * s) @ vt, scale * (b @ a)) < 1e-10 or scale == 0.0


def test_factored_svd_flops_follow_the_route():
    # dense: W = P Q dominates; factored: grows with the cube of the sum of the ranks
    dense = la.factored_svd_flops(576, 576, [64] * 40, 64)
    assert dense >= 2 * 576 * 576 * 2560 and dense < 1.5 * 2 * 576 * 576 * 2560
    factored = la.factored_svd_flops(4096, 4096, [16] * 10, 16)
    assert factored >= 4 * 8192 * 160**2


NEW_BAD_CALLS = {
    "psum rank < max": (lambda: la.padded_sum([B, B2], [A, A2], [1, 1], 2), "rank 2"),
    "psum filler": (lambda: la.padded_sum([B], [A], [1], 4, "gaussian"), "gaussian"),
    "psum d_in": (lambda: la.padded_sum([B, B], [A, A[:, :2]], [1, 1], 3), "d_in"),
    "psum weights": (lambda: la.padded_sum([B], [A], [float("nan")], 3), "finite"),
    "add c shape": (lambda: la.add_stacked_product(B @ A[:, :4], [B], [A], [1]), "shape"),
    "add pair": (lambda: la.add_stacked_product(B @ A, [B2], [A], [1]), "share the rank"),
}


@pytest.mark.parametrize("case", list(NEW_BAD_CALLS), ids=list(NEW_BAD_CALLS))
def test_bad_input_to_the_streaming_sums_raises_value_error(case):
    call, message = NEW_BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call()
