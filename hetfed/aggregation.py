"""Aggregation rules shared by several methods, on LoRA modules by name (pure numpy).

Each takes the replies as ``{module: (B_k, A_k)}`` dicts (already converted to the global
scaling, :mod:`hetfed.scaling`) and the global modules, and returns new global modules of the
global modules' ranks. The per-matrix math is :mod:`hetfed.lora_algebra`; here it is applied
module by module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from hetfed import lora_algebra as la
from hetfed.adapter_state import LoraPairs, State

Weights = Sequence[float] | Mapping[str, Sequence[float]]  # one vector, or one per module


def _of(weights: Weights, module: str) -> Sequence[float]:
    return weights[module] if isinstance(weights, Mapping) else weights


def padded_weighted_sum(
    replies: Sequence[LoraPairs],
    modules: Iterable[str],
    rank: int,
    weights: Weights,
    filler: str = "zero",
) -> LoraPairs:
    """Per module, the weighted sum of the replies padded to ``rank`` with ``filler``

        B <- sum_k w_k B~_k,   A <- sum_k w_k A~_k   (weights as given, per module or shared),

    :func:`hetfed.lora_algebra.padded_sum`: each reply added once, in place, no padded copies.
    Zero-padding and FedIT (one rank: the padding is the identity), HetLoRA (sparsity weights),
    HeLoRA-Pad (fillers, n_k r_k weights), the layer methods and HeLoRA-KD's groups."""
    return {
        module: la.padded_sum(
            [pairs[module][0] for pairs in replies],
            [pairs[module][1] for pairs in replies],
            _of(weights, module),
            rank,
            filler,
        )
        for module in modules
    }


def per_index_average(
    replies: Sequence[LoraPairs], global_lora: LoraPairs, weights: Sequence[float]
) -> LoraPairs:
    """Per module, rank index i averaged over the replies that hold it (RBLA, Chen et al., arXiv
    2408.08699; HeLoRA-Pad's per-rank-index option), :func:`hetfed.lora_algebra.
    average_per_rank_index` at the global rank; indices no reply holds keep the global values."""
    aggregated = {}
    for module, (global_b, global_a) in global_lora.items():
        held = max(pairs[module][0].shape[1] for pairs in replies)
        b, a = la.average_per_rank_index(
            [pairs[module][0] for pairs in replies],
            [pairs[module][1] for pairs in replies],
            weights,
            global_b.shape[1],
        )
        b[:, held:] = global_b[:, held:]
        a[held:, :] = global_a[held:, :]
        aggregated[module] = (b, a)
    return aggregated


def sparsity_weights(replies: Sequence[LoraPairs], per_module: bool) -> dict[str, np.ndarray]:
    """HetLoRA's weights (Cho et al., EMNLP 2024): normalised S_k / sum S, S_k = ||B_k A_k||_F,
    per module or one per reply over all its modules, sqrt(sum over modules of ||B_k,m A_k,m||^2).

    Replies whose update is all zero would make sum S zero; then every reply gets the same
    weight.
    """
    modules = list(replies[0])
    norms = np.array([[la.product_frobenius_norm(*pairs[m]) for m in modules] for pairs in replies])
    if not per_module:
        norms = np.repeat(np.sqrt((norms**2).sum(axis=1, keepdims=True)), len(modules), axis=1)
    weights = {}
    for j, module in enumerate(modules):
        column = norms[:, j]
        weights[module] = la.normalize_weights(column if column.sum() > 0 else np.ones_like(column))
    return weights


def head_average(heads: Sequence[State], num_examples: Sequence[int], global_head: State) -> State:
    """The task head, averaged with the data weights p_k = n_k / sum(n) (every method)."""
    weights = la.normalize_weights(num_examples)
    return {
        key: la.weighted_sum([head[key] for head in heads], weights).astype(ref.dtype)
        for key, ref in global_head.items()
    }


def _module_factors(replies: Sequence[LoraPairs], module: str) -> tuple[list, list]:
    return [pairs[module][0] for pairs in replies], [pairs[module][1] for pairs in replies]


def svd_modules(
    replies: Sequence[LoraPairs],
    global_lora: LoraPairs,
    weights: Sequence[float],
    svd: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] = la.factored_svd,
    scaling: float = 1.0,
) -> LoraPairs:
    """Per module, the leading r_max singular triplets of the replies' weighted sum, ``svd(bs,
    as_, weights, rank)``, kept at the global rank r_max as B = U S / scaling, A = V^T
    (:func:`hetfed.lora_algebra.svd_factors`). FlexLoRA (Bai et al., NeurIPS 2024):
    :func:`hetfed.lora_algebra.factored_svd` of W = sum_k w_k B_k A_k; raFLoRA (Wu et al., arXiv
    2602.13486): :func:`hetfed.lora_algebra.partitioned_svd`, each rank partition averaged over
    the replies that hold it. Fewer components than r_max (the reply ranks sum to less, or
    d_out, d_in < r_max): the missing ones are zero in both factors."""
    aggregated = {}
    for module, (global_b, global_a) in global_lora.items():
        bs, as_ = _module_factors(replies, module)
        r_max = global_b.shape[1]
        rank = min(r_max, global_b.shape[0], global_a.shape[1], sum(b.shape[1] for b in bs))
        b, a = la.svd_factors(*svd(bs, as_, weights, rank), rank, scaling=scaling)
        if rank < r_max:
            b, a = la.pad(b, a, r_max, "zero")
        aggregated[module] = (b.astype(global_b.dtype), a.astype(global_a.dtype))
    return aggregated


def thresholded_svd_modules(
    replies: Sequence[LoraPairs],
    global_lora: LoraPairs,
    weights: Sequence[float],
    threshold: float,
) -> tuple[LoraPairs, dict[str, int]]:
    """FLoRIST (Ramesh and Dass, arXiv 2506.09199), per module: the SVD of
    W = sum_k p_k B_k A_k from the stacked factors (:func:`hetfed.lora_algebra.factored_svd`: the
    d_out x d_in W is never formed while sum r_k < min(d_out, d_in)), its energy rank
    p = :func:`hetfed.lora_algebra.energy_rank` and one global pair of the global rank r_max:

    - components i < min(p, r_max): B[:, i] = U[:, i] S_i, A[i, :] = V^T[i, :] (the thresholded
      update; p > r_max keeps the best rank-r_max part, the most the global adapter holds);
    - components min(p, r_max) <= i < r_max: B[:, i] = 0 and A[i, :] = V^T[i, :], the next right
      singular vectors (zero update, but trainable as a fresh LoRA component is), and zero in both
      factors where W has no more singular vectors (sum r_k or d_out, d_in below r_max).

    Returns the new modules and each module's energy rank p (before the r_max cap).
    """
    aggregated, kept = {}, {}
    for module, (global_b, global_a) in global_lora.items():
        bs, as_ = _module_factors(replies, module)
        r_max = global_b.shape[1]
        available = min(global_b.shape[0], global_a.shape[1], sum(b.shape[1] for b in bs))
        u, s, vt = la.factored_svd(bs, as_, weights, available)  # every singular value
        kept[module] = la.energy_rank(s, threshold)
        signal = min(kept[module], r_max)
        spare = min(available, r_max) - signal
        b, a = la.svd_factors(u, s, vt, signal)
        if spare:
            b = np.concatenate([b, np.zeros((b.shape[0], spare), b.dtype)], axis=1)
            a = np.concatenate([a, vt[signal : signal + spare]], axis=0)
        if b.shape[1] < r_max:
            b, a = la.pad(b, a, r_max, "zero")
        aggregated[module] = (b.astype(global_b.dtype), a.astype(global_a.dtype))
    return aggregated, kept


def fair_corrected_modules(
    replies: Sequence[LoraPairs],
    global_lora: LoraPairs,
    weights: Sequence[float],
    lam: float,
    product_weights: Sequence[float] | None = None,
) -> LoraPairs:
    """LoRA-FAIR (Bian et al., ICCV 2025, arXiv 2411.14961), per module: the replies zero-padded
    to the largest reply rank, averaged with ``weights`` and B corrected
    (:func:`hetfed.lora_algebra.fair_correction`): B <- B_avg + dB, A <- A_avg, where dB fits
    (B_avg + dB) A_avg to dW = sum_k v_k B_k A_k (``product_weights`` v, default ``weights``)
    with ridge ``lam``. Rank indices that no reply holds keep their global values (as RBLA), so a
    round without the large clients leaves their components as they were."""
    aggregated = {}
    for module, (global_b, global_a) in global_lora.items():
        bs, as_ = _module_factors(replies, module)
        held = max(b.shape[1] for b in bs)
        b, a = la.fair_correction(bs, as_, weights, held, lam, product_weights)
        if held < global_b.shape[1]:
            b = np.concatenate([b, global_b[:, held:]], axis=1)
            a = np.concatenate([a, global_a[held:]], axis=0)
        aggregated[module] = (b.astype(global_b.dtype), a.astype(global_a.dtype))
    return aggregated


def exact_residual_deltas(
    products: Sequence[LoraPairs],
    weights: Sequence[float],
    new_lora: LoraPairs,
    scaling: float,
    deltas: Mapping[str, np.ndarray],
) -> State:
    """FedEx-LoRA's base-weight deltas (Singhal et al., ACL 2025, arXiv 2410.09432): per module
    m of ``new_lora`` (the new global factors B_m, A_m, at scaling s),

        delta_m <- delta_m + sum_k w_k B_k,m A_k,m - s B_m A_m

    (:func:`hetfed.lora_algebra.add_exact_residual`), so that the global model
    W0 + delta_m + s B_m A_m moves by exactly sum_k w_k B_k,m A_k,m (w_k = p_k s_k: the weighted
    sum of the clients' products), whatever B_m and A_m are. Every product must hold every module
    of ``new_lora``; a module without a delta starts from zero, and deltas of other modules are
    kept as they are."""
    new_deltas = dict(deltas)
    for module, (b, a) in new_lora.items():
        missing = [k for k, pairs in enumerate(products) if module not in pairs]
        if missing:
            raise ValueError(f"products {missing} lack module {module!r}; each must hold it")
        new_deltas[module] = la.add_exact_residual(
            deltas.get(module),
            [pairs[module][0] for pairs in products],
            [pairs[module][1] for pairs in products],
            weights,
            b,
            a,
            scaling,
        )
    return new_deltas


def tail_pairs(lora: LoraPairs, rank: int) -> LoraPairs:
    """Every module's rank components ``rank..r-1``: ``(B[:, rank:], A[rank:, :])``, what a
    truncation to ``rank`` (:func:`hetfed.lora_algebra.truncate`) leaves out, so that
    ``B A = B[:, :rank] A[:rank, :] + B[:, rank:] A[rank:, :]``. Views of ``lora``'s arrays;
    ``rank`` must be below every module's rank."""
    for module, (b, _) in lora.items():
        if not 0 <= rank < b.shape[1]:
            raise ValueError(f"rank {rank} leaves no tail of {module!r} (rank {b.shape[1]})")
    return {module: (b[:, rank:], a[rank:, :]) for module, (b, a) in lora.items()}


def tail_deltas(
    lora: LoraPairs, deltas: Mapping[str, np.ndarray], rank: int, scaling: float
) -> State:
    """The base deltas of a model that holds the truncation of ``lora`` to ``rank`` and equals
    the full one: per module, delta_m + s B_m[:, rank:] A_m[rank:, :] (:func:`tail_pairs`,
    :func:`hetfed.lora_algebra.add_stacked_product`), so that
    W0 + delta_m + s B_m A_m = W0 + delta'_m + s B_m[:, :rank] A_m[:rank, :]. hetfed's option for
    FedEx-LoRA (``fedex-lora.fold-tail``), no paper's rule. A module whose tail is zero (B's
    columns ``rank..``: the initial adapter) keeps its delta, or gets none."""
    new_deltas = dict(deltas)
    for module, (tail_b, tail_a) in tail_pairs(lora, rank).items():
        if not tail_b.any():
            continue
        old = deltas.get(module)
        if old is None:
            old = np.zeros((tail_b.shape[0], tail_a.shape[1]), np.result_type(tail_b, tail_a))
        new_deltas[module] = la.add_stacked_product(old, [tail_b], [tail_a], [scaling])
    return new_deltas
