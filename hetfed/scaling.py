"""LoRA scaling across ranks: what s_k B_k A_k means to a client and to the server.

A rank-r LoRA module adds ``s B A`` to its frozen weight, with a scaling ``s`` that depends on the
rank: peft's ``alpha / r`` by default, rsLoRA's ``alpha / sqrt(r)`` (Kalajdzievski, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv 2312.03732) with
``use_rslora``. When a rank-r_k client is sent the first r_k components of a rank-r_max global
adapter, it applies them at its own s_k while the global model applies them at s_g, so the
model it starts from is not the global model and its update enters the global model
s_g / s_k times too weak (docs/scaling.md has a worked example).

hetfed's rule, applied by the strategy base to every method (``lora.rescale = true``): the
sent truncation has B multiplied by s_g / s_k, and a reply's B is multiplied by s_k / s_g before
any aggregation (s_k the scaling the client trained at), so

    s_k B_k A_k = s_g B[:, :r_k] A[:r_k, :]     (down)   and the product keeps its size (up).

The scaling rules (``lora.scaling``), each a choice of the alpha a rank-r adapter is built with:

- ``standard``: peft's s = alpha / r;
- ``rslora``: s = alpha / sqrt(r) (peft's ``use_rslora``);
- ``fixed``: s = alpha / r_max for every rank, r_max the largest tier rank (the adapter's alpha is
  alpha r / r_max under peft's alpha / r), so ranks and step sizes are not confounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from hetfed.adapter_state import LORA_B, factor_of

SCALING_RULES = ("standard", "rslora", "fixed")


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """peft's scaling of a rank-``rank`` adapter: alpha / sqrt(r) with rsLoRA, else alpha / r."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def rule_alpha(rule: str, alpha: float, rank: int, max_rank: int) -> float:
    """The LoRA alpha a rank-``rank`` adapter is built with under ``rule`` (see the module)."""
    if rule not in SCALING_RULES:
        raise ValueError(f"scaling rule {rule!r}; allowed: {', '.join(SCALING_RULES)}")
    return alpha * rank / max_rank if rule == "fixed" else alpha


def rescale_b(b: np.ndarray, factor: float) -> np.ndarray:
    """factor B in B's dtype: with the same A, the product at a scaling ``factor`` times smaller."""
    return b if factor == 1.0 else (b * factor).astype(b.dtype, copy=False)


def rescale_state(state: Mapping[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """Every LoRA module's B times ``factor`` (its product ``factor`` times larger); A, the
    head and a state without B (a reply whose B stays on the client) as they are."""
    return {k: rescale_b(v, factor) if factor_of(k) == LORA_B else v for k, v in state.items()}
