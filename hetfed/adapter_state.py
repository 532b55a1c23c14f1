"""Adapter state: an adapter as named numpy arrays, and the operations on it every method uses.

A state maps peft's state-dict names to arrays: ``<module>.lora_A.weight`` (r x d_in) and
``<module>.lora_B.weight`` (d_out x r) for every LoRA module, the head's tensors
(``...classifier.weight``/``bias``), and, for methods that merge updates into the base model
(FLoRA), a dense ``<module>.base_layer.delta`` (d_out x d_in). Here: splitting it into factor
pairs and head, joining it back, truncating, mapping and restricting it to transformer blocks.
How a state travels between server and clients is :mod:`hetfed.wire`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from hetfed import lora_algebra

LORA_A = "lora_A"  # peft's names of the two factors
LORA_B = "lora_B"
_A_SUFFIX = f".{LORA_A}.weight"
_B_SUFFIX = f".{LORA_B}.weight"
# A dense change of a frozen base weight (d_out x d_in) that the client adds to the base layer
# before training: FLoRA merges stacked updates into the base model this way.
BASE_DELTA_SUFFIX = ".base_layer.delta"

State = dict[str, np.ndarray]
LoraPairs = dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (B, A)


def split_state(state: Mapping[str, np.ndarray]) -> tuple[LoraPairs, State]:
    """Separate LoRA factor pairs (by module name) from the head's arrays.

    Base-weight deltas (:func:`base_deltas`) belong to neither and are left out.
    """
    pairs: LoraPairs = {}
    head: State = {}
    for key, value in state.items():
        if key.endswith(_A_SUFFIX):
            module = key[: -len(_A_SUFFIX)]
            pairs[module] = (state[module + _B_SUFFIX], value)
        elif not key.endswith((_B_SUFFIX, BASE_DELTA_SUFFIX)):
            head[key] = value
    return pairs, head


def base_deltas(state: Mapping[str, np.ndarray]) -> State:
    """Dense base-weight deltas by module name (empty for every method but merging ones)."""
    return {
        key[: -len(BASE_DELTA_SUFFIX)]: value
        for key, value in state.items()
        if key.endswith(BASE_DELTA_SUFFIX)
    }


def with_base_deltas(state: Mapping[str, np.ndarray], deltas: Mapping[str, np.ndarray]) -> State:
    """``state`` plus the given base-weight deltas (by module name)."""
    return {**state, **{module + BASE_DELTA_SUFFIX: d for module, d in deltas.items()}}


def trainable(state: Mapping[str, np.ndarray]) -> State:
    """What a client trains and returns: everything but base-weight deltas."""
    return {k: v for k, v in state.items() if not k.endswith(BASE_DELTA_SUFFIX)}


def join_state(pairs: LoraPairs, head: Mapping[str, np.ndarray]) -> State:
    """Inverse of :func:`split_state`."""
    state: State = {}
    for module, (b, a) in pairs.items():
        state[module + _A_SUFFIX] = a
        state[module + _B_SUFFIX] = b
    state.update(head)
    return state


def map_lora(
    state: Mapping[str, np.ndarray],
    fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> State:
    """Apply ``fn(B, A) -> (B', A')`` to every LoRA module; everything else is kept as it is."""
    pairs, _ = split_state(state)
    rest = {k: v for k, v in state.items() if not k.endswith((_A_SUFFIX, _B_SUFFIX))}
    return join_state({module: fn(b, a) for module, (b, a) in pairs.items()}, rest)


def truncate_state(state: Mapping[str, np.ndarray], rank: int) -> State:
    """Every LoRA module cut to its first ``rank`` components (HetLoRA's distribution)."""
    return map_lora(state, lambda b, a: lora_algebra.truncate(b, a, rank))


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks)\.(\d+)\.")


def layer_of(module: str) -> int | None:
    """The transformer block a module belongs to, matched by its exact index.

    ``...encoder.layer.1.attention.self.query`` is block 1, never 10 or 11 (the Fed-HeLLo code
    matched digit substrings; hetfed matches ``layer.{i}.`` exactly). Modules outside the
    blocks (e.g. the head) have no layer.
    """
    match = _LAYER_INDEX.search(module + ".")
    return int(match.group(1)) if match else None


def restrict_to_layers(state: Mapping[str, np.ndarray], layers: Iterable[int]) -> State:
    """The LoRA modules of ``state`` inside ``layers``, plus everything that is not LoRA."""
    keep = set(layers)
    pairs, _ = split_state(state)
    dropped = {m for m in pairs if layer_of(m) not in keep}
    return {
        k: v
        for k, v in state.items()
        if not k.endswith((_A_SUFFIX, _B_SUFFIX)) or module_of(k) not in dropped
    }


def module_of(key: str) -> str:
    """The LoRA module a factor's key belongs to."""
    return key[: -len(_A_SUFFIX)] if key.endswith(_A_SUFFIX) else key[: -len(_B_SUFFIX)]


def without_factors(state: Mapping[str, np.ndarray], factors: Iterable[str]) -> State:
    """``state`` less the LoRA factors named in ``factors`` (e.g. ``(LORA_B,)``)."""
    factors = set(factors)
    return {k: v for k, v in state.items() if factor_of(k) not in factors}


def factor_of(key: str) -> str | None:
    """``lora_A`` or ``lora_B`` for a LoRA factor's key, None for anything else."""
    if key.endswith(_A_SUFFIX):
        return LORA_A
    return LORA_B if key.endswith(_B_SUFFIX) else None
