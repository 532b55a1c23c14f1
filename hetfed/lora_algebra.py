"""Linear algebra on LoRA factors, shared by the heterogeneous-rank strategies.

Notation
--------
A LoRA module on a frozen weight ``W0`` (``d_out x d_in``) has ``B`` (``d_out x r``) and ``A``
(``r x d_in``); its update is ``dW = s * B @ A`` with scaling ``s = alpha / r``. "Rank index" ``i``
of a module means column ``i`` of ``B`` together with row ``i`` of ``A``. Client ``k`` of ``K``
holds ``B_k`` (``d_out x r_k``) and ``A_k`` (``r_k x d_in``) and has weight ``w_k``.

Everything here is a pure function on numpy arrays: no Flower, no torch, no state.

Conventions
-----------
* Weights are used as given. Only :func:`normalize_weights` normalises; every other function
  takes the weights the caller passes (so a caller can fold a per-client scaling ``s_k`` into
  ``w_k``), but rejects negative, non-finite or all-zero weights.
* dtypes: a function returns the dtype of its inputs (``np.result_type`` over all matrices it
  combines; integer or bool inputs give ``float64``; complex inputs are rejected). Where rounding
  matters (sums over clients, means, Gram matrices, QR and SVD) the work is done in ``float64``
  and the result is cast back to that dtype at the end.
* Bad input raises ``ValueError`` whose message names the offending value and what is allowed.
* Results never alias their inputs: slices are returned as copies.

References
----------
* HetLoRA: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
  Models", arXiv 2401.06432 (EMNLP 2024).
* HeLoRA: Fan et al., "HeLoRA: LoRA-heterogeneous Federated Fine-tuning for Foundation Models",
  ACM TOIT 25(2), 2025.
* FLoRA: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
  Low-Rank Adaptations", NeurIPS 2024.
* FlexLoRA: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
  and Client Resources", NeurIPS 2024.
* RBLA: Chen et al., "RBLA: Rank-Based-LoRA-Aggregation for Fine-tuning Heterogeneous Models in
  FLaaS", arXiv 2408.08699.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

__all__ = [
    "FILLERS",
    "average_per_rank_index",
    "factored_svd",
    "normalize_weights",
    "pad",
    "product_frobenius_norm",
    "stack",
    "svd_factors",
    "tail_norm_product",
    "truncate",
    "weighted_sum",
]

FILLERS: tuple[str, ...] = ("zero", "mean", "linear", "adjacent")
"""Padding fillers of HeLoRA-Pad, see :func:`pad`."""


# --------------------------------------------------------------------------- validation helpers


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a 2-D real numpy array (no copy when it already is one)."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix; got an array of shape {arr.shape}")
    if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    return arr


def _out_dtype(*arrays: np.ndarray) -> np.dtype:
    """Common result dtype: the inputs' floating dtype, or float64 for integer/bool inputs."""
    dtype = np.result_type(*arrays)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _check_pair(b: np.ndarray, a: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Validate one LoRA pair: B is d_out x r, A is r x d_in, r >= 1."""
    b = _as_matrix(b, f"b{where}")
    a = _as_matrix(a, f"a{where}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(
            f"b{where} has {b.shape[1]} columns but a{where} has {a.shape[0]} rows; "
            f"B (d_out x r) and A (r x d_in) must share the rank r (shapes {b.shape}, {a.shape})"
        )
    if b.shape[1] < 1:
        raise ValueError(f"LoRA rank of b{where}/a{where} is 0; allowed: rank >= 1")
    return b, a


def _check_rank(rank: int, low: int, high: int, what: str) -> int:
    """``rank`` must be an integer with ``low <= rank <= high``."""
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise ValueError(f"rank must be an integer; got {rank!r} ({type(rank).__name__})")
    rank = int(rank)
    if not low <= rank <= high:
        raise ValueError(f"rank {rank} is out of range; allowed: {low} <= rank <= {high} ({what})")
    return rank


def _check_grown_rank(rank: int, least: int, what: str) -> int:
    """``rank`` as an int, at least ``least`` (``what`` names that bound in the error)."""
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise ValueError(f"rank must be an integer; got {rank!r} ({type(rank).__name__})")
    if rank < least:
        raise ValueError(f"rank {rank} is smaller than {what}, {least}; allowed: rank >= {least}")
    return int(rank)


def _check_weights(weights: Sequence[float], count: int | None = None) -> np.ndarray:
    """Weights as a float64 vector: non-empty, finite, non-negative, with a positive sum."""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"weights must be a sequence of real numbers; got {weights!r}") from err
    if w.ndim != 1:
        raise ValueError(f"weights must be a 1-D sequence; got an array of shape {w.shape}")
    if w.size == 0:
        raise ValueError("weights is empty; allowed: at least one non-negative weight")
    if count is not None and w.size != count:
        raise ValueError(
            f"got {w.size} weights for {count} clients; allowed: one weight per client"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite; got {w.tolist()}")
    if np.any(w < 0):
        raise ValueError(f"weights must be non-negative; got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError(f"weights sum to {w.sum()}; allowed: a positive sum (not all zero)")
    return w


def _check_clients(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float]
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Validate K clients' pairs: same d_out for every B, same d_in for every A, one weight each."""
    bs, as_ = list(bs), list(as_)
    if not bs:
        raise ValueError("bs is empty; allowed: at least one client")
    if len(bs) != len(as_):
        raise ValueError(f"got {len(bs)} B matrices and {len(as_)} A matrices; they must match")
    pairs = [_check_pair(b, a, f"[{k}]") for k, (b, a) in enumerate(zip(bs, as_, strict=True))]
    bs = [b for b, _ in pairs]
    as_ = [a for _, a in pairs]
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    for k, (b, a) in enumerate(pairs):
        if b.shape[0] != d_out or a.shape[1] != d_in:
            raise ValueError(
                f"client {k} has B {b.shape} and A {a.shape}, but client 0 has d_out={d_out}, "
                f"d_in={d_in}; every client must share d_out and d_in (ranks may differ)"
            )
    w = _check_weights(weights, count=len(bs))
    return bs, as_, w


# --------------------------------------------------------------------------------- functions


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Return ``w / sum(w)`` as a float64 vector.

    Used for the data weights ``p_k = n_k / sum(n)`` of FedAvg-style aggregation (and any other
    per-client weights, e.g. HetLoRA's ``S_k / sum(S)``, Cho et al. arXiv 2401.06432).

    Raises ``ValueError`` if ``weights`` is empty, not 1-D, or has a negative or non-finite entry,
    or if it sums to zero.
    """
    w = _check_weights(weights)
    return w / w.sum()


def truncate(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the leading ``rank`` rank indices: ``(B[:, :rank], A[:rank, :])``, as copies.

    HetLoRA's distribution by truncation (Cho et al., arXiv 2401.06432), also used by HeLoRA-Pad
    and RBLA broadcast. Requires ``1 <= rank <= r``. dtypes are kept.
    """
    b, a = _check_pair(b, a)
    rank = _check_rank(rank, 1, b.shape[1], "at least 1 and at most the current rank")
    # Copies: callers mutate the client's modules in place and must not touch the global ones.
    return b[:, :rank].copy(), a[:rank, :].copy()


def pad(
    b: np.ndarray, a: np.ndarray, rank: int, filler: str = "zero"
) -> tuple[np.ndarray, np.ndarray]:
    """Grow a pair from rank ``r`` to ``rank >= r`` with one of HeLoRA-Pad's fillers.

    HeLoRA's context-based padding (Fan et al., ACM TOIT 25(2) 2025; fillers from the authors'
    code). New columns ``r..rank-1`` of ``B`` and rows ``r..rank-1`` of ``A`` are:

    * ``zero``: zeros, so ``B A`` is unchanged (the HetLoRA / naive zero-padding baseline);
    * ``mean``: the matrix's scalar mean, ``mean(B)`` in ``B`` and ``mean(A)`` in ``A``;
    * ``linear``: every new row of ``A`` is ``A.mean(axis=0)`` (the mean of A's rows) and every
      new column of ``B`` is ``B.mean(axis=1)`` (the mean of B's columns);
    * ``adjacent``: copies of A's last row and of B's last column.

    ``rank == r`` returns copies whatever the filler. The leading ``r`` indices are kept exactly.
    Means are taken in float64; dtypes are kept.
    """
    b, a = _check_pair(b, a)
    if filler not in FILLERS:
        raise ValueError(f"unknown filler {filler!r}; allowed: {', '.join(FILLERS)}")
    r = b.shape[1]
    rank = _check_grown_rank(rank, r, "the current rank (pad only grows; truncate shrinks)")
    extra = rank - r
    b_dtype, a_dtype = _out_dtype(b), _out_dtype(a)
    d_out, d_in = b.shape[0], a.shape[1]
    if filler == "zero":
        new_b = np.zeros((d_out, extra))
        new_a = np.zeros((extra, d_in))
    elif filler == "mean":
        new_b = np.full((d_out, extra), b.mean(dtype=np.float64))
        new_a = np.full((extra, d_in), a.mean(dtype=np.float64))
    elif filler == "linear":
        new_b = np.repeat(b.mean(axis=1, dtype=np.float64)[:, None], extra, axis=1)
        new_a = np.repeat(a.mean(axis=0, dtype=np.float64)[None, :], extra, axis=0)
    else:  # adjacent
        new_b = np.repeat(b[:, -1:], extra, axis=1)
        new_a = np.repeat(a[-1:, :], extra, axis=0)
    # concatenate always allocates, so the leading block is a copy even when extra == 0.
    out_b = np.concatenate([b.astype(b_dtype, copy=False), new_b.astype(b_dtype)], axis=1)
    out_a = np.concatenate([a.astype(a_dtype, copy=False), new_a.astype(a_dtype)], axis=0)
    return out_b, out_a


def product_frobenius_norm(b: np.ndarray, a: np.ndarray) -> float:
    """``||B A||_F`` without forming the ``d_out x d_in`` product.

    ``||B A||_F^2 = trace((B^T B)(A A^T))``: two ``r x r`` Gram matrices, cost
    ``O((d_out + d_in) r^2)``. This is HetLoRA's sparsity weight ``S_k`` (Cho et al.,
    arXiv 2401.06432). Computed in float64; the result is clamped at 0 before the square root
    because rounding can make a tiny trace negative. Relative accuracy degrades (to about
    ``eps * ||B||^2 ||A||^2 / ||B A||^2``) when the product cancels heavily.
    """
    b, a = _check_pair(b, a)
    b64 = b.astype(np.float64, copy=False)
    a64 = a.astype(np.float64, copy=False)
    gram_b = b64.T @ b64
    gram_a = a64 @ a64.T
    # trace(X Y) = sum(X * Y^T), and Y = A A^T is symmetric.
    sq = float(np.sum(gram_b * gram_a))
    return math.sqrt(max(sq, 0.0))


def tail_norm_product(b: np.ndarray, a: np.ndarray, keep: int) -> float:
    """HetLoRA's rank self-pruning score ``||B[:, keep:]||_F * ||A[keep:, :]||_F``.

    Cho et al., arXiv 2401.06432: the regulariser ``lambda * ||B[:, q:r]|| ||A[q:r, :]||`` with
    ``q = floor(gamma * r)``; when it decreases during local training the client prunes to ``q``.
    Requires ``0 <= keep <= r``; ``keep == r`` gives 0. Computed in float64.
    """
    b, a = _check_pair(b, a)
    r = b.shape[1]
    if isinstance(keep, bool) or not isinstance(keep, int | np.integer):
        raise ValueError(f"keep must be an integer; got {keep!r} ({type(keep).__name__})")
    if not 0 <= keep <= r:
        raise ValueError(f"keep {keep} is out of range; allowed: 0 <= keep <= {r} (the rank)")
    tail_b = np.linalg.norm(b[:, keep:].astype(np.float64, copy=False))
    tail_a = np.linalg.norm(a[keep:, :].astype(np.float64, copy=False))
    return float(tail_b * tail_a)


def weighted_sum(matrices: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_k w_k M_k`` with the weights as given (not normalised).

    FedAvg of one factor (FedIT, zero-padding, HetLoRA's sparsity-weighted aggregation, Cho et al.
    arXiv 2401.06432). Callers normalise with :func:`normalize_weights` when they want an
    average. All arrays must share one shape (any number of dimensions, so a head's bias vector
    works too); weights must be non-negative, finite, not all zero. Accumulated in float64,
    returned in the inputs' common dtype.
    """
    mats = [np.asarray(m) for m in matrices]
    if not mats:
        raise ValueError("matrices is empty; allowed: at least one matrix")
    w = _check_weights(weights, count=len(mats))
    shape = mats[0].shape
    for k, m in enumerate(mats):
        if m.shape != shape:
            raise ValueError(
                f"matrices[{k}] has shape {m.shape} but matrices[0] has {shape}; "
                "all matrices must share one shape (pad or truncate first)"
            )
    acc = np.zeros(shape, dtype=np.float64)
    for wk, m in zip(w, mats, strict=True):
        acc += wk * m
    return acc.astype(_out_dtype(*mats), copy=False)


def stack(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA's stacking: ``B_s = [B_1 | ... | B_K]``, ``A_s = [w_1 A_1; ...; w_K A_K]``.

    Wang et al., NeurIPS 2024. ``B_s`` is ``d_out x sum r_k`` and ``A_s`` is ``sum r_k x d_in``,
    and ``B_s A_s = sum_k w_k B_k A_k`` exactly (ranks may differ between clients). Weights are
    used as given and folded into the A side, as in FLoRA's code. Returned in the inputs'
    common dtype; the products ``w_k A_k`` are formed in float64 first.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    dtype = _out_dtype(*bs, *as_)
    b_s = np.concatenate(bs, axis=1).astype(dtype, copy=False)
    a_s = np.concatenate(
        [
            (wk * a.astype(np.float64, copy=False)).astype(dtype)
            for wk, a in zip(w, as_, strict=True)
        ],
        axis=0,
    )
    return b_s, a_s


def factored_svd(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float],
    rank: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``rank`` singular triplets of ``W = sum_k w_k B_k A_k``, never forming ``W``.

    FlexLoRA's server step (Bai et al., NeurIPS 2024), computed from the factors. With
    ``P = [sqrt(w_1) B_1 | ... | sqrt(w_K) B_K]`` (``d_out x R``, ``R = sum r_k``) and
    ``Q = [sqrt(w_1) A_1; ...; sqrt(w_K) A_K]`` (``R x d_in``), ``W = P Q``. Then

    ``P = Q_P R_P`` and ``Q^T = Q_Q R_Q`` (reduced QR), ``R_P R_Q^T = U' S V'^T`` (small SVD),
    ``U = Q_P U'`` and ``V^T = V'^T Q_Q^T``,

    so ``W = U diag(S) V^T``. Returns ``(U[:, :rank], S[:rank], Vt[:rank, :])`` with ``S``
    non-increasing; ``rank`` must satisfy ``1 <= rank <= min(d_out, d_in, R)``.

    Weights are used as given: pass ``w_k = p_k * s_k`` to include each client's LoRA scaling as
    FlexLoRA does. The square root goes on both sides to keep P and Q equally well scaled.
    Memory is ``O((d_out + d_in) R + R^2)``; no ``d_out x d_in`` array is allocated (the core
    ``R_P R_Q^T`` is at most ``min(d_out, R) x min(d_in, R)``) unless ``R >= min(d_out, d_in)``:
    then the core is ``d_out x d_in`` anyway, and ``W = P Q`` (one product, no QR) is computed
    and decomposed directly, the cheaper of two equal-sized routes. Everything is computed in
    float64 and cast back to the inputs' common dtype.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    dtype = _out_dtype(*bs, *as_)
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    total = sum(b.shape[1] for b in bs)
    rank = _check_rank(
        rank, 1, min(d_out, d_in, total), f"min(d_out={d_out}, d_in={d_in}, sum of ranks={total})"
    )
    sqrt_w = np.sqrt(w)
    p = np.concatenate(
        [sw * b.astype(np.float64, copy=False) for sw, b in zip(sqrt_w, bs, strict=True)], axis=1
    )
    if total >= min(d_out, d_in):  # the stack is as wide as the layer: W itself is no larger
        q = np.concatenate(
            [sw * a.astype(np.float64, copy=False) for sw, a in zip(sqrt_w, as_, strict=True)]
        )
        u, s, vt = np.linalg.svd(p @ q, full_matrices=False)
        return (
            u[:, :rank].astype(dtype),
            s[:rank].astype(dtype),
            vt[:rank, :].astype(dtype),
        )
    q_p, r_p = np.linalg.qr(p)  # d_out x m, m x R with m = min(d_out, R)
    del p  # free before the second QR to keep the peak low
    # Q^T built directly: d_in x R.
    qt = np.concatenate(
        [sw * a.astype(np.float64, copy=False).T for sw, a in zip(sqrt_w, as_, strict=True)], axis=1
    )
    q_q, r_q = np.linalg.qr(qt)  # d_in x n, n x R with n = min(d_in, R)
    del qt
    core = r_p @ r_q.T  # m x n, the only part whose size does not grow with d_out * d_in
    del r_p, r_q
    u_core, s, vt_core = np.linalg.svd(core, full_matrices=False)
    del core
    # Only the leading `rank` triplets are lifted back to full size.
    u = q_p @ u_core[:, :rank]
    vt = vt_core[:rank, :] @ q_q.T
    return u.astype(dtype, copy=False), s[:rank].astype(dtype), vt.astype(dtype, copy=False)


def svd_factors(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, scaling: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """FlexLoRA's redistribution to one client: ``B = U_r diag(S_r) / scaling``, ``A = Vt_r``.

    Bai et al., NeurIPS 2024. With ``U_r = U[:, :rank]``, ``S_r = S[:rank]``,
    ``Vt_r = Vt[:rank, :]``, ``scaling * B A = U_r diag(S_r) Vt_r`` is the best rank-``rank``
    approximation (Eckart-Young) of ``W = U diag(S) Vt``. ``scaling`` is the client's LoRA scaling
    ``s_k = alpha_k / r_k`` and must be positive and finite. ``S`` must be non-negative and
    non-increasing, as :func:`factored_svd` returns it. Returned in the inputs' common dtype.
    """
    u = _as_matrix(u, "u")
    vt = _as_matrix(vt, "vt")
    s = np.asarray(s)
    if s.ndim != 1:
        raise ValueError(f"s must be a 1-D vector of singular values; got shape {s.shape}")
    k = s.shape[0]
    if u.shape[1] != k or vt.shape[0] != k:
        raise ValueError(
            f"u {u.shape}, s {s.shape} and vt {vt.shape} do not fit together; allowed: "
            "u (d_out x k), s (k,), vt (k x d_in)"
        )
    if np.any(s < 0) or np.any(np.diff(s) > 0):
        raise ValueError("s must be non-negative and non-increasing (singular values, descending)")
    rank = _check_rank(rank, 1, k, "at least 1 and at most the number of singular values")
    if (
        isinstance(scaling, bool)
        or not isinstance(scaling, numbers.Real)
        or not math.isfinite(scaling)
    ):
        raise ValueError(f"scaling must be a finite number; got {scaling!r}")
    if scaling <= 0:
        raise ValueError(f"scaling must be positive; got {scaling!r}")
    dtype = _out_dtype(u, s, vt)
    b = u[:, :rank].astype(np.float64) * (s[:rank].astype(np.float64) / float(scaling))
    return b.astype(dtype, copy=False), vt[:rank, :].astype(dtype)


def average_per_rank_index(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float],
    rank: int,
) -> tuple[np.ndarray, np.ndarray]:
    """RBLA: average each rank index over only the clients that have it.

    Chen et al., arXiv 2408.08699 (also HeLoRA's per-rank-index option). The result has rank
    ``rank >= max_k r_k``. Column ``i`` of ``B`` and row ``i`` of ``A`` are

    ``sum_{k: r_k > i} w_k X_k[i] / sum_{k: r_k > i} w_k``,

    so the weights' scale does not matter. An index that no client has, or whose clients all have
    weight 0, is zero. Averaged in float64, returned in the inputs' common dtype.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    dtype = _out_dtype(*bs, *as_)
    ranks = np.array([b.shape[1] for b in bs])
    rank = _check_grown_rank(rank, int(ranks.max()), "the largest client rank")
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    num_b = np.zeros((d_out, rank))
    num_a = np.zeros((rank, d_in))
    den = np.zeros(rank)  # sum of the weights of the clients holding each index
    for wk, b, a in zip(w, bs, as_, strict=True):
        r = b.shape[1]
        num_b[:, :r] += wk * b
        num_a[:r, :] += wk * a
        den[:r] += wk
    # Indices with no (positively weighted) client stay zero instead of dividing by zero.
    held = den > 0
    num_b[:, held] /= den[held]
    num_a[held, :] /= den[held, None]
    return num_b.astype(dtype, copy=False), num_a.astype(dtype, copy=False)


def low_rank_factors(matrix: np.ndarray, rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Exact factors of a dense matrix up to its numerical rank: ``B A = M`` (to ``rtol``).

    SVD ``M = U S V^T``; keep the components with ``S_i > rtol * S_0``; ``B = U S``,
    ``A = V^T``. Used once, at export, to write a merged update (FLoRA, Wang et al. NeurIPS
    2024) as a LoRA adapter with scaling 1. Returns rank >= 1 (a zero matrix gives one zero
    component). Computed in float64, returned in the input's dtype.
    """
    m = _as_matrix(matrix, "matrix")
    u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    keep = max(1, int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 1)
    dtype = _out_dtype(m)
    return (u[:, :keep] * s[:keep]).astype(dtype), vt[:keep].astype(dtype)
