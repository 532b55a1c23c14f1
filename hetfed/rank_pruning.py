"""HetLoRA's local rank self-pruning: the rule both sides share, and the client's penalty.

Cho et al., arXiv 2401.06432, Sec. 3: the local loss gets a penalty on the tail of each module,
lambda * ||B[:, q:r]||_F * ||A[q:r, :]||_F with q = floor(gamma * r). The client records the
tail score (summed over modules) when the modules arrive and after training; if it decreased,
the tail is dropping out of use and the client prunes to rank :func:`pruned_rank`, which the
server also uses to know which reply ranks to accept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from hetfed import lora_algebra as la
from hetfed.adapter_state import split_state


def keep_rank(rank: int, gamma: float) -> int:
    """q = floor(gamma * r): the leading components that are not penalised."""
    return math.floor(gamma * rank)


def pruned_rank(rank: int, gamma: float, min_rank: int) -> int:
    """The rank a client prunes to: r <- max(r_min, floor(gamma * r))."""
    return max(min_rank, keep_rank(rank, gamma))


def tail_score(state: Mapping[str, np.ndarray], keep: int) -> float:
    """sum over modules of ||B[:, keep:]||_F * ||A[keep:, :]||_F."""
    pairs, _ = split_state(state)
    return float(sum(la.tail_norm_product(b, a, keep) for b, a in pairs.values()))


def tail_penalty(
    model: nn.Module, adapter_name: str, keep: int, lam: float
) -> Callable[[], torch.Tensor]:
    """The differentiable penalty lambda * sum_m ||B_m[:, keep:]||_F ||A_m[keep:, :]||_F."""
    factors = [
        (m.lora_B[adapter_name].weight, m.lora_A[adapter_name].weight)
        for m in model.modules()
        if hasattr(m, "lora_A") and adapter_name in getattr(m, "lora_A", {})
    ]

    def penalty() -> torch.Tensor:
        return lam * sum(
            torch.linalg.norm(b[:, keep:]) * torch.linalg.norm(a[keep:, :]) for b, a in factors
        )

    return penalty
