"""Wire format: how adapters and their metadata travel between ServerApp and ClientApp.

An adapter travels as an ``ArrayRecord`` under ``"arrays"`` whose keys are peft's state-dict
names: ``<module>.lora_A.weight`` (r x d_in), ``<module>.lora_B.weight`` (d_out x r) for every
LoRA module, and the head's tensors (``...classifier.weight``/``bias``). Instructions travel in a
``ConfigRecord`` under ``"config"`` (the keys below); a training reply carries a ``MetricRecord``
under ``"metrics"`` that states the rank the client actually returns.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from hetfed import lora_algebra

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
BUDGET = "budget"

# Keys of the train instruction (server -> client).
SERVER_ROUND = "server-round"
RANK = "rank"
LORA_ALPHA = "lora-alpha"
LORA_RSLORA = "lora-rslora"  # peft's use_rslora: scaling alpha / sqrt(rank) instead of alpha / rank
LORA_SCALING = "lora-scaling"  # the scaling s_k the server reads the client's product at
SEED = "seed"
PROFILES = "profiles"
PRUNE_GAMMA = "prune-gamma"
PRUNE_LAMBDA = "prune-lambda"
PRUNE_MIN_RANK = "prune-min-rank"
LAYERS = "layers"  # the transformer blocks whose LoRA modules the client trains (all if absent)
# LoRA factors (LORA_A, LORA_B) the client keeps fixed while it trains (none if absent); it still
# returns them, unchanged. The FFA-LoRA example plugin (examples/) freezes A this way.
FROZEN = "frozen"
FAULT = "fault"  # failure injection (faults.*): how this client misbehaves this round
FAULT_SECONDS = "fault-seconds"  # how long a "timeout" fault waits before replying

# Keys of the reply metrics (client -> server).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
SECONDS = "seconds"
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"
TIER = "tier"
CLIENT_ID = "client-id"  # budget reply: a number naming the client across runs (its partition)

LORA_A = "lora_A"  # peft's names of the two factors, as FROZEN lists them
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


def state_rank(state: Mapping[str, np.ndarray]) -> int:
    """The rank of an adapter's LoRA modules (they all share one rank)."""
    ranks = {a.shape[0] for _, a in split_state(state)[0].values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter modules have different ranks: {sorted(ranks)}")
    return ranks.pop()


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
        if not k.endswith((_A_SUFFIX, _B_SUFFIX)) or _module(k) not in dropped
    }


def _module(key: str) -> str:
    return key[: -len(_A_SUFFIX)] if key.endswith(_A_SUFFIX) else key[: -len(_B_SUFFIX)]


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {key: array.numpy() for key, array in record.items()}


def nbytes(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(value.nbytes for value in state.values()))


def reply_problem(
    reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], rank: int
) -> str | None:
    """Why a client's arrays cannot be aggregated, or None when they can.

    The reply must have exactly the keys that were sent, LoRA factors of the claimed ``rank``
    with the sent outer dimensions, head arrays of the sent shapes, float dtypes and finite values.
    """
    missing = sorted(set(sent) - set(reply))
    if missing:
        return f"missing arrays {missing[:3]}"
    extra = sorted(set(reply) - set(sent))
    if extra:
        return f"unexpected arrays {extra[:3]}"
    for key, value in reply.items():
        ref = sent[key]
        if key.endswith(_A_SUFFIX):
            expected = (rank, ref.shape[1])
        elif key.endswith(_B_SUFFIX):
            expected = (ref.shape[0], rank)
        else:
            expected = ref.shape
        if value.shape != tuple(expected):
            return f"{key} has shape {value.shape}, expected {tuple(expected)}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"{key} has dtype {value.dtype}, expected a float dtype"
        if not np.all(np.isfinite(value)):
            return f"{key} has non-finite values"
    return None


def update_norm(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """||reply - sent||_F over every array, the sent factors cut to the reply's (pruned) rank."""
    total = 0.0
    for key, value in reply.items():
        ref = sent[key][tuple(slice(0, n) for n in value.shape)]
        total += float(np.sum((value.astype(np.float64) - ref) ** 2))
    return float(np.sqrt(total))
