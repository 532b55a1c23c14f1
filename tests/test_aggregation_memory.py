"""The SVD-based and corrected aggregations never hold a layer-sized (d_out x d_in) matrix while
the replies' ranks sum to less than the layer's width."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from hetfed import lora_algebra as la
from hetfed.aggregation import (
    fair_corrected_modules,
    svd_modules,
    thresholded_svd_modules,
)
from tests.harness import random_replies

WEIGHTS = [0.25] * 4
AGGREGATIONS = {
    "florist": lambda replies, lora: thresholded_svd_modules(replies, lora, WEIGHTS, 0.9),
    "raflora": lambda replies, lora: svd_modules(replies, lora, WEIGHTS, svd=la.partitioned_svd),
    "lora-fair": lambda replies, lora: fair_corrected_modules(replies, lora, WEIGHTS, 0.01),
}


@pytest.mark.parametrize("method", AGGREGATIONS)
def test_no_layer_sized_matrix_is_held(method):
    """d = 2048, ranks 2/4/8/4: one d x d float64 matrix is 32 MiB; the peak stays under 8."""
    d = 2048
    replies = random_replies(np.random.default_rng(5), (2, 4, 8, 4), d, d)
    global_lora = {"m": (np.zeros((d, 8), np.float32), np.zeros((8, d), np.float32))}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        AGGREGATIONS[method](replies, global_lora)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < d * d * 8 / 4
