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
  combines; integer or bool inputs give ``float64``; complex inputs are rejected). The sums of
  the LoRA factors over clients (:func:`padded_sum`, :func:`average_per_rank_index`,
  :func:`stack` and :func:`add_stacked_product`) and HetLoRA's Gram matrices
  (:func:`product_frobenius_norm`) are computed in place in that dtype: they stream every reply
  once, and float32 replies give float32 sums whose rounding (about ``sqrt(K) eps_32 ~ 1e-6``
  relative for K clients) is far below what a float32 reply holds. Where rounding decides the
  result (means, the head's :func:`weighted_sum`, FlexLoRA's product, Gram matrix, QR and SVD,
  whose leading subspace moves by the rounding divided by a gap between singular values) the
  work is done in ``float64`` and the result is cast back to that dtype at the end.
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
import scipy.linalg

__all__ = [
    "FILLERS",
    "add_exact_residual",
    "add_stacked_product",
    "average_per_rank_index",
    "energy_rank",
    "factored_svd",
    "factored_svd_flops",
    "fair_correction",
    "low_rank_factors",
    "normalize_weights",
    "pad",
    "padded_sum",
    "partitioned_svd",
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

_REAL_KINDS = "biuf"  # numpy dtype kinds of bool, signed and unsigned integers, floats


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a 2-D real numpy array (no copy when it already is one)."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix; got an array of shape {arr.shape}")
    if arr.dtype.kind not in _REAL_KINDS:
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
    bs, as_ = [np.asarray(b) for b in bs], [np.asarray(a) for a in as_]
    if not bs:
        raise ValueError("bs is empty; allowed: at least one client")
    if len(bs) != len(as_):
        raise ValueError(f"got {len(bs)} B matrices and {len(as_)} A matrices; they must match")
    b0, a0 = _check_pair(bs[0], as_[0], "[0]")
    d_out, d_in = b0.shape[0], a0.shape[1]
    for k, (b, a) in enumerate(zip(bs, as_, strict=True)):
        b, a = _check_pair(b, a, f"[{k}]")
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

    ``||B A||_F^2 = trace((B^T B)(A A^T))``: two ``r x r`` Gram matrices, ``(d_out + d_in) r^2``
    flops (BLAS syrk forms one triangle: ``r (r + 1) / 2`` multiply-adds a row). This is
    HetLoRA's sparsity weight ``S_k`` (Cho et al., arXiv 2401.06432). The Gram matrices are
    computed in the factors' dtype (float32 factors: float32, relative error about
    ``sqrt(d) eps_32``, a few 1e-7 at d = 1536), their elementwise products summed in float64;
    the result is clamped at 0 before the square root because rounding can make a tiny trace
    negative. Relative accuracy degrades (to about ``eps * ||B||^2 ||A||^2 / ||B A||^2``) when
    the product cancels heavily.
    """
    b, a = _check_pair(b, a)
    dtype = _out_dtype(b, a)
    b = b.astype(dtype, copy=False)
    a = a.astype(dtype, copy=False)
    gram_b = b.T @ b
    gram_a = a @ a.T
    # trace(X Y) = sum(X * Y^T), and Y = A A^T is symmetric.
    sq = float(np.sum(gram_b * gram_a, dtype=np.float64))
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
    common dtype; each ``w_k A_k`` is written straight into ``A_s`` in that dtype.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    return _stack(bs, as_, w, _out_dtype(*bs, *as_))


def _stack(
    bs: list[np.ndarray], as_: list[np.ndarray], w: np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`stack` on validated inputs, in ``dtype``."""
    return np.concatenate(bs, axis=1, dtype=dtype), _scaled_concat(as_, w, 0, dtype)


def _scaled_concat(
    mats: Sequence[np.ndarray], scales: np.ndarray, axis: int, dtype: np.dtype
) -> np.ndarray:
    """``[c_1 M_1, ..., c_K M_K]`` joined along ``axis`` (0: rows, 1: columns), each product
    written straight into the result, computed in ``dtype``."""
    sizes = [m.shape[axis] for m in mats]
    shape = list(mats[0].shape)
    shape[axis] = sum(sizes)
    out = np.empty(shape, dtype)
    start = 0
    for scale, m, size in zip(scales.tolist(), mats, sizes, strict=True):
        part = slice(start, start + size)
        np.multiply(m, scale, out=out[part] if axis == 0 else out[:, part], dtype=dtype)
        start += size
    return out


def add_stacked_product(
    c: np.ndarray, bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float]
) -> np.ndarray:
    """``C + sum_k w_k B_k A_k``: FLoRA's merge of the stacked updates into the base weights.

    Wang et al., NeurIPS 2024. ``sum_k w_k B_k A_k = B_s A_s`` (:func:`stack`), so the merge is
    one matrix product, ``2 d_out d_in R`` flops for ``R = sum r_k``, which BLAS gemm adds to a
    copy of ``C`` (``d_out x d_in``) in place (beta = 1: no product array is allocated). Weights
    are used as given. Computed in the common dtype of ``C`` and the factors (float32 deltas and
    replies: float32, see the conventions above) and returned in it; ``C`` is not modified.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    c = _as_matrix(c, "c")
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    if c.shape != (d_out, d_in):
        raise ValueError(f"c has shape {c.shape}; allowed: (d_out, d_in) = {(d_out, d_in)}")
    dtype = _out_dtype(c, *bs, *as_)
    b_s, a_s = _stack(bs, as_, w, dtype)
    out = np.array(c, dtype=dtype, order="C")  # C-ordered, so out.T is Fortran-ordered
    gemm = scipy.linalg.get_blas_funcs("gemm", (out,))
    # (C + B_s A_s)^T = A_s^T B_s^T + C^T, all three Fortran-ordered views: BLAS works in place.
    return gemm(1.0, a_s.T, b_s.T, beta=1.0, c=out.T, overwrite_c=True).T


def _dense_route(d_out: int, d_in: int, total: int) -> bool:
    """Whether :func:`factored_svd` forms ``W``: its stack is at least as wide as the layer."""
    return total >= min(d_out, d_in)


def factored_svd(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float],
    rank: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``rank`` singular triplets of ``W = sum_k w_k B_k A_k``.

    FlexLoRA's server step (Bai et al., NeurIPS 2024), computed from the factors. With
    ``P = [sqrt(w_1) B_1 | ... | sqrt(w_K) B_K]`` (``d_out x R``, ``R = sum r_k``) and
    ``Q = [sqrt(w_1) A_1; ...; sqrt(w_K) A_K]`` (``R x d_in``), ``W = P Q``. Two exact routes:

    * ``R < min(d_out, d_in)`` (factored, ``W`` never formed): ``P = Q_P R_P`` and
      ``Q^T = Q_Q R_Q`` (reduced QR), ``R_P R_Q^T = U' S V'^T`` (SVD of the ``R x R`` core),
      ``U = Q_P U'`` and ``V^T = V'^T Q_Q^T``. Memory ``O((d_out + d_in) R + R^2)``.
    * ``R >= min(d_out, d_in)`` (dense: the core would be ``d_out x d_in`` anyway): ``W = P Q``
      (one product), then its leading triplets through the Gram matrix of its smaller side
      (:func:`_leading_svd`): with ``M = W`` (or ``W^T`` when ``d_out < d_in``),
      ``M^T M = X diag(S^2) X^T`` (``n x n``, ``n = min(d_out, d_in)``, only the leading ``rank``
      eigenvectors), and ``M X = Y diag(S)`` by a QR of ``M X``. No full SVD of the
      ``d_out x d_in`` matrix.

    Either way ``W = U diag(S) V^T``. Returns ``(U[:, :rank], S[:rank], Vt[:rank, :])`` with
    ``S`` non-increasing; ``rank`` must satisfy ``1 <= rank <= min(d_out, d_in, R)``. Singular
    vectors are unique up to sign (and within equal singular values), their products are not.
    Operation counts: :func:`factored_svd_flops`.

    Weights are used as given: pass ``w_k = p_k * s_k`` to include each client's LoRA scaling as
    FlexLoRA does. The square root goes on both sides to keep P and Q equally well scaled.
    Everything is computed in float64 (the leading subspace moves by the rounding of ``W``
    divided by the gap below ``S[rank - 1]``) and cast back to the inputs' common dtype.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    dtype = _out_dtype(*bs, *as_)
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    total = sum(b.shape[1] for b in bs)
    rank = _check_rank(
        rank, 1, min(d_out, d_in, total), f"min(d_out={d_out}, d_in={d_in}, sum of ranks={total})"
    )
    sqrt_w = np.sqrt(w)
    if _dense_route(d_out, d_in, total):
        p = _scaled_concat(bs, sqrt_w, 1, np.dtype(np.float64))
        u, s, vt = _leading_svd(p @ _scaled_concat(as_, sqrt_w, 0, np.dtype(np.float64)), rank)
    else:
        u, s, vt = _core_svd(bs, as_, sqrt_w, rank)
    return u.astype(dtype, copy=False), s.astype(dtype), vt.astype(dtype, copy=False)


def _core_svd(
    bs: list[np.ndarray], as_: list[np.ndarray], sqrt_w: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`factored_svd`'s factored route: QR of ``P`` and ``Q^T``, SVD of the small core."""
    p = _scaled_concat(bs, sqrt_w, 1, np.dtype(np.float64))  # d_out x R
    q_p, r_p = np.linalg.qr(p)  # d_out x m, m x R with m = min(d_out, R)
    del p  # free before the second QR to keep the peak low
    # Q^T built directly: d_in x R.
    qt = _scaled_concat([a.T for a in as_], sqrt_w, 1, np.dtype(np.float64))
    q_q, r_q = np.linalg.qr(qt)  # d_in x n, n x R with n = min(d_in, R)
    del qt
    core = r_p @ r_q.T  # m x n, the only part whose size does not grow with d_out * d_in
    del r_p, r_q
    u_core, s, vt_core = np.linalg.svd(core, full_matrices=False)
    del core
    # Only the leading `rank` triplets are lifted back to full size.
    return q_p @ u_core[:, :rank], s[:rank], vt_core[:rank, :] @ q_q.T


def _leading_svd(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading ``rank`` singular triplets of a float64 matrix through the Gram matrix of its
    smaller side.

    ``M = W`` when ``W`` is tall, else ``W^T`` (``m x n``, ``m >= n``). The top ``rank``
    eigenvectors ``X`` of ``M^T M = X diag(S^2) X^T`` (LAPACK syevr on ``n x n``) are the right
    singular vectors; the QR of ``M X = Y R`` (largest first) gives the left ones, ``Y`` with
    signs making the diagonal of ``R`` non-negative, and ``S = diag(R)`` (``||M x_i||``,
    accurate also where ``S^2`` is lost in the rounding of ``M^T M``; a zero singular value still
    gets a unit vector orthogonal to the others). Sorted by ``S``, non-increasing.
    ``M = Y diag(S) X^T`` up to rounding of order ``eps S_0^2 / S_i`` in component ``i``.
    """
    tall = w.shape[0] >= w.shape[1]
    m = w if tall else w.T
    n = m.shape[1]
    gram = m.T @ m  # n x n (BLAS syrk)
    _, x = scipy.linalg.eigh(
        gram, subset_by_index=[n - rank, n - 1], overwrite_a=True, check_finite=False
    )
    x = np.ascontiguousarray(x[:, ::-1])  # descending: the QR takes the largest first
    q, r = np.linalg.qr(m @ x)
    diagonal = np.diagonal(r)
    y = q * np.where(diagonal < 0, -1.0, 1.0)
    order = np.argsort(-np.abs(diagonal), kind="stable")
    y, s, x = y[:, order], np.abs(diagonal)[order], x[:, order]
    return (y, s, x.T) if tall else (x, s, y.T)


def factored_svd_flops(d_out: int, d_in: int, ranks: Sequence[int], rank: int) -> float:
    """Floating-point operations (a multiply-add counts 2) of :func:`factored_svd` on replies of
    ``ranks`` and a ``d_out x d_in`` layer, by the route it takes, from the classic counts
    (Golub and Van Loan), with ``R = sum(ranks)``, ``n = min(d_out, d_in)``, ``m = max``:

    * dense: ``W = P Q`` 2 d_out d_in R; Gram m n^2 (syrk); top-``rank`` eigenpairs
      4/3 n^3 (tridiagonal reduction) + 2 n^2 rank (back-transformation); ``M X`` 2 m n rank;
      its QR and Q 4 m rank^2;
    * factored: QR of P and Q^T with their Q 4 (d_out + d_in) R^2; core 2 R^3; its SVD 26 R^3;
      lifts 2 (d_out + d_in) R rank.
    """
    total = sum(ranks)
    n, m = min(d_out, d_in), max(d_out, d_in)
    if _dense_route(d_out, d_in, total):
        return float(
            2 * d_out * d_in * total
            + m * n * n
            + 4 / 3 * n**3
            + 2 * n * n * rank
            + 2 * m * n * rank
            + 4 * m * rank * rank
        )
    return float(4 * (d_out + d_in) * total**2 + 28 * total**3 + 2 * (d_out + d_in) * total * rank)


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


def _rank_sums(
    bs: list[np.ndarray], as_: list[np.ndarray], w: np.ndarray, dtype: np.dtype
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``T_r = sum_{k: r_k = r} w_k (B_k, A_k)`` for each distinct client rank ``r``, every reply
    added in place into its rank's sum, a contiguous array (inputs already validated)."""
    sums: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for wk, b, a in zip(w.tolist(), bs, as_, strict=True):  # Python floats keep float32 float32
        r = b.shape[1]
        if r not in sums:
            sums[r] = (np.zeros((b.shape[0], r), dtype), np.zeros((r, a.shape[1]), dtype))
        sum_b, sum_a = sums[r]
        _add_scaled(sum_b, wk, b)
        _add_scaled(sum_a, wk, a)
    return sums


_AXPY = {
    np.dtype(np.float32): scipy.linalg.blas.saxpy,
    np.dtype(np.float64): scipy.linalg.blas.daxpy,
}


def _add_scaled(total: np.ndarray, scale: float, x: np.ndarray) -> None:
    """``total += scale * x`` in place, in ``total``'s dtype; ``total`` is C-ordered. BLAS axpy
    where both share a float dtype and ``x`` is C-ordered (one pass over ``x``, no temporary),
    numpy otherwise."""
    axpy = _AXPY.get(total.dtype)
    if axpy is not None and x.dtype == total.dtype and x.flags.c_contiguous:
        axpy(x.reshape(-1), total.reshape(-1), a=scale)
    else:
        total += np.multiply(x, scale, dtype=total.dtype)


def _padded_sum(
    bs: list[np.ndarray], as_: list[np.ndarray], w: np.ndarray, rank: int, filler: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`padded_sum` on validated inputs."""
    dtype = _out_dtype(*bs, *as_)
    out_b = np.zeros((bs[0].shape[0], rank), dtype)
    out_a = np.zeros((rank, as_[0].shape[1]), dtype)
    for sum_b, sum_a in _rank_sums(bs, as_, w, dtype).values():
        pad_b, pad_a = pad(sum_b, sum_a, rank, filler)
        out_b += pad_b
        out_a += pad_a
    return out_b, out_a


def padded_sum(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float],
    rank: int,
    filler: str = "zero",
) -> tuple[np.ndarray, np.ndarray]:
    """``sum_k w_k pad(B_k, A_k, rank, filler)``, without a padded copy of any reply.

    The padded weighted sum of zero-padding and FedIT (one rank: the padding is the identity),
    HetLoRA (Cho et al., arXiv 2401.06432, sparsity weights), HeLoRA-Pad (Fan et al., ACM TOIT
    25(2) 2025, fillers) and the layer methods. Every filler of :func:`pad` is linear in the
    factors (zeros, a mean, a row or column mean, a copy of the last row or column), so

        sum_k w_k pad(B_k, A_k) = sum_r pad(T_r),   T_r = sum_{k: r_k = r} w_k (B_k, A_k):

    each reply is added once, in place, into the sum of its rank (``T_r += w_k B_k``, as a plain
    weighted accumulation does), and only the few per-rank sums are padded. Weights are used as
    given; ``rank`` must be at least every client's rank. Accumulated in the inputs' common dtype
    (float32 replies: float32, see the conventions above), returned in it.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    if filler not in FILLERS:
        raise ValueError(f"unknown filler {filler!r}; allowed: {', '.join(FILLERS)}")
    largest = max(b.shape[1] for b in bs)
    rank = _check_grown_rank(rank, largest, "the largest client rank")
    return _padded_sum(bs, as_, w, rank, filler)


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
    weight 0, is zero. The numerators are the zero-padded sum (:func:`padded_sum`, accumulated in
    place in the inputs' common dtype), the denominators are summed in float64; returned in the
    inputs' common dtype.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    ranks = [b.shape[1] for b in bs]
    rank = _check_grown_rank(rank, max(ranks), "the largest client rank")
    num_b, num_a = _padded_sum(bs, as_, w, rank, "zero")
    den = np.zeros(rank)  # sum of the weights of the clients holding each index
    for wk, r in zip(w, ranks, strict=True):
        den[:r] += wk
    # Indices with no (positively weighted) client stay zero instead of dividing by zero.
    held = den > 0
    np.divide(num_b, den, out=num_b, where=held)
    np.divide(num_a, den[:, None], out=num_a, where=held[:, None])
    return num_b, num_a


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


# ------------------------------------------------- FLoRIST, raFLoRA and LoRA-FAIR (per matrix)


def energy_rank(s: np.ndarray, threshold: float) -> int:
    """FLoRIST's singular value thresholding: the fewest leading components that keep a
    ``threshold`` share of the squared singular-value energy,

        p = min { p : sum_{i < p} S_i^2 >= threshold * sum_i S_i^2 }.

    Ramesh and Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated
    Fine-Tuning of Large Language Models", arXiv 2506.09199 (the authors' code: the first index
    whose cumulative energy share reaches the threshold, plus one). ``s`` must be non-negative and
    non-increasing, ``0 < threshold <= 1``. Summed in float64; where rounding leaves the total share
    just under the threshold every component is kept. All-zero ``s`` (no update) gives 1, the least
    rank a LoRA module can have.
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"s must be a non-empty 1-D vector of singular values; got {s.shape}")
    if np.any(s < 0) or np.any(np.diff(s) > 0):
        raise ValueError("s must be non-negative and non-increasing (singular values, descending)")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not 0 < threshold <= 1
    ):
        raise ValueError(f"threshold must be a number in (0, 1]; got {threshold!r}")
    energy = np.cumsum(s**2)
    if energy[-1] <= 0:
        return 1
    first = int(np.searchsorted(energy, threshold * energy[-1], side="left"))
    return min(first + 1, s.size)


def partitioned_svd(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float],
    rank: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """raFLoRA's aggregate: leading ``rank`` singular triplets of the rank-partitioned sum

        W = sum_j sum_{k in K_j} (w_k / sum_{h in K_j} w_h) B_k[:, I_j] A_k[I_j, :],

    where ``r_(1) < r_(2) < ...`` are the distinct client ranks (``r_(0) = 0``), partition
    ``I_j = r_(j-1) .. r_(j) - 1`` and ``K_j = {k : r_k >= r_(j)}`` the clients whose rank covers
    it. Each partition is thus averaged only over the clients that hold it, with the weights
    renormalised within them. Wu, Hu, Min and Wang, "Preventing Rank Collapse in Federated
    Low-Rank Adaptation with Client Heterogeneity", arXiv 2602.13486 (raFLoRA: rank-partitioned
    aggregation, then FlexLoRA's SVD redistribution).

    Every client in ``K_j`` holds every index of ``I_j`` and no other client holds any, so this is
    also the per-rank-index weighting ``w_k / sum_{h: r_h > i} w_h`` of index ``i``; with one rank
    it is :func:`factored_svd` of ``sum_k w_k B_k A_k`` (FlexLoRA). The partition pieces are
    views of the replies passed to :func:`factored_svd` as clients of their own, so the same
    routes and memory bounds hold: ``W`` (``d_out x d_in``) is never formed while
    ``R = sum r_k < min(d_out, d_in)``. A partition whose holders all have weight 0 adds nothing.
    ``1 <= rank <= min(d_out, d_in, R)``.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    ranks = [b.shape[1] for b in bs]
    part_bs, part_as, part_w = [], [], []
    low = 0
    for high in sorted(set(ranks)):
        holders = [k for k, r in enumerate(ranks) if r >= high]
        total = float(w[holders].sum())
        for k in holders:
            part_bs.append(bs[k][:, low:high])
            part_as.append(as_[k][low:high, :])
            part_w.append(float(w[k]) / total if total > 0 else 0.0)
        low = high
    return factored_svd(part_bs, part_as, part_w, rank)


def fair_correction(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float],
    rank: int,
    lam: float,
    product_weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """LoRA-FAIR's server-side correction: ``(B_avg + dB, A_avg)``.

    Bian, Wang, Zhang and Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
    Initialization Refinement", ICCV 2025 (arXiv 2411.14961). With the factors zero-padded to
    ``rank`` (:func:`padded_sum`), ``B_avg = sum_k w_k B~_k``, ``A_avg = sum_k w_k A~_k`` and the
    ideal update ``dW = sum_k v_k B_k A_k`` (``v = product_weights``, default ``w``), ``dB``
    minimises ``||(B_avg + dB) A_avg - dW||_F^2 + lam ||dB||_F^2``:

        dB = (dW - B_avg A_avg) A_avg^T (A_avg A_avg^T + lam I)^+

    (the inverse for ``lam > 0``; for ``lam = 0`` the pseudo-inverse, the least-norm solution
    when ``A_avg`` has dependent rows). ``dW`` is never formed, whatever the sizes:
    ``dW A_avg^T = sum_k v_k B_k (A_k A_avg^T)`` and ``B_avg A_avg A_avg^T = B_avg G``, so the
    work is ``O((d_out + d_in) R rank)`` for ``R = sum r_k`` with ``rank x rank`` systems.

    ``rank`` must be at least every client's rank, ``lam`` finite and ``>= 0``. The averages are
    accumulated as :func:`padded_sum` does (the inputs' dtype), the correction in float64; both
    returned in the inputs' common dtype.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    v = w if product_weights is None else _check_weights(product_weights, count=len(bs))
    rank = _check_grown_rank(rank, max(b.shape[1] for b in bs), "the largest client rank")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number; got {lam!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0; got {lam!r}")
    dtype = _out_dtype(*bs, *as_)
    b_avg, a_avg = _padded_sum(bs, as_, w, rank, "zero")
    a64 = a_avg.astype(np.float64)
    gram = a64 @ a64.T  # rank x rank
    target = np.zeros((b_avg.shape[0], rank))  # dW A_avg^T, one reply at a time
    for vk, b, a in zip(v.tolist(), bs, as_, strict=True):
        target += vk * (b.astype(np.float64) @ (a.astype(np.float64) @ a64.T))
    residual = target - b_avg.astype(np.float64) @ gram  # (dW - B_avg A_avg) A_avg^T
    # Symmetric positive (semi)definite; the cut-off only matters for lam = 0 and a singular G.
    inverse = np.linalg.pinv(gram + lam * np.eye(rank), rcond=1e-12, hermitian=True)
    corrected = b_avg.astype(np.float64) + residual @ inverse
    return corrected.astype(dtype, copy=False), a_avg


# -------------------------------------------------------------------- FedEx-LoRA (per matrix)


def add_exact_residual(
    c: np.ndarray | None,
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float],
    b: np.ndarray,
    a: np.ndarray,
    scaling: float,
) -> np.ndarray:
    """``C + sum_k w_k B_k A_k - scaling * B A``: FedEx-LoRA's residual folded into the base.

    Singhal, Ponkshe and Vepakomma, "Exact Aggregation for Federated and Efficient Fine-Tuning of
    Foundation Models", ACL 2025 (arXiv 2410.09432). The server keeps the averaged factors
    ``B, A`` as the global adapter (scaling ``s``) and adds the residual of the average to the
    frozen weight's delta ``C``, so that with ``w_k = p_k s_k``

        W0 + C' + s B A = W0 + C + sum_k p_k s_k B_k A_k

    whatever ``B`` and ``A`` are: the global model moves by exactly the weighted sum of the
    clients' products (ranks may differ). ``C = None`` is a zero matrix (the first residual).

    One product of stacks, ``[B_1 | ... | B_K | B] [w_1 A_1; ...; w_K A_K; -s A]``
    (``2 d_out d_in (R + r)`` flops for ``R = sum r_k``), added by BLAS gemm in place to a copy
    of ``C``: no ``d_out x d_in`` temporary besides the result. Weights are used as given and
    must be non-negative; ``scaling`` must be finite and ``>= 0``. Computed in the common dtype
    of ``C`` and the factors (float32 deltas and replies: float32, as
    :func:`add_stacked_product`) and returned in it; ``C`` is not modified.
    """
    bs, as_, w = _check_clients(bs, as_, weights)
    b, a = _check_pair(b, a, "[global]")
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    if b.shape[0] != d_out or a.shape[1] != d_in:
        raise ValueError(
            f"the global pair has B {b.shape} and A {a.shape}; allowed: d_out={d_out} and "
            f"d_in={d_in}, those of the clients"
        )
    if (
        isinstance(scaling, bool)
        or not isinstance(scaling, numbers.Real)
        or not math.isfinite(scaling)
        or scaling < 0
    ):
        raise ValueError(f"scaling must be a finite number >= 0; got {scaling!r}")
    if c is not None:
        c = _as_matrix(c, "c")
        if c.shape != (d_out, d_in):
            raise ValueError(f"c has shape {c.shape}; allowed: (d_out, d_in) = {(d_out, d_in)}")
    dtype = _out_dtype(*bs, *as_, b, a, *(() if c is None else (c,)))
    stacked_b = np.concatenate([*bs, b], axis=1, dtype=dtype)
    stacked_a = _scaled_concat([*as_, a], np.append(w, -float(scaling)), 0, dtype)
    out = np.zeros((d_out, d_in), dtype) if c is None else np.array(c, dtype=dtype, order="C")
    gemm = scipy.linalg.get_blas_funcs("gemm", (out,))
    # (C + B_s A_s)^T = A_s^T B_s^T + C^T on Fortran-ordered views, in place (see above).
    return gemm(1.0, stacked_a.T, stacked_b.T, beta=1.0, c=out.T, overwrite_c=True).T
