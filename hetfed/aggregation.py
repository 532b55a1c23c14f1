"""Aggregation rules shared by several methods, on LoRA modules by name (pure numpy).

Each takes the replies as ``{module: (B_k, A_k)}`` dicts (already converted to the global
scaling, :mod:`hetfed.scaling`) and the global modules, and returns new global modules of the
global modules' ranks. The per-matrix math is :mod:`hetfed.lora_algebra`; here it is applied
module by module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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
