"""The wire: what travels between the ServerApp and the ClientApp, and how it is laid out.

A message's content is a ``RecordDict``:

- a budget query (server -> client, ``QUERY``): the device profiles under ``"config"``;
  the reply: a :class:`BudgetReply` under ``"budget"``;
- a train message (``TRAIN``): the adapter arrays under ``"arrays"`` (an ``ArrayRecord`` named by
  peft's state-dict keys, :mod:`hetfed.adapter_state`) and a :class:`TrainInstruction` under
  ``"config"``; the reply: the trained arrays under ``"arrays"`` and a :class:`TrainReply` under
  ``"metrics"``.

Each record type is a small dataclass with ``to_record``/``from_record``, used on both sides, so
the layout is written once. ``from_record`` reads untrusted input: anything malformed is a
``ValueError`` naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

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
PROFILES = "profiles"  # of the budget query
TIER_MEMORY = "tier-memory-gb"  # of the budget query: GB each tier's update needs, in tier order
PRUNE_GAMMA = "prune-gamma"
PRUNE_LAMBDA = "prune-lambda"
PRUNE_MIN_RANK = "prune-min-rank"
LAYERS = "layers"  # the transformer blocks whose LoRA modules the client trains (all if absent)
# LoRA factors (lora_A, lora_B) the client keeps fixed while it trains (none if absent); it still
# returns them, unchanged. The FFA-LoRA example plugin (examples/) freezes A this way.
FROZEN = "frozen"
# LoRA factors the client keeps to itself across rounds (FedSA-LoRA's B): they are neither sent
# nor returned; the client trains them from its own value of an earlier round (peft's initial
# value the first time), kept under the run's PERSONAL_KEY (:mod:`client_apps.personal_state`).
PERSONAL = "personal"
PERSONAL_KEY = "personal-key"  # names the run (it survives a resume): whose values to load
LOCAL_STEPS = "local-steps"  # fewer local steps than the run's (a straggler under a deadline)
FAULT = "fault"  # failure injection (hetfed.faults): how this client misbehaves this round
FAULT_SECONDS = "fault-seconds"  # how long a "timeout" fault waits before replying

# Keys of the reply metrics (client -> server) and of the budget reply.
NUM_EXAMPLES = "num-examples"
ACCURACY = "accuracy"  # of an evaluate reply
LOSS = "loss"
TEST_ACCURACY = "test-accuracy"  # of an evaluate reply that scored the local test split too
TEST_LOSS = "test-loss"
TRAIN_LOSS = "train-loss"
SECONDS = "seconds"
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"
TIER = "tier"
CLIENT_ID = "client-id"  # a number naming the client across runs (its partition)


def _get(record: Mapping[str, Any], key: str, kind: type) -> Any:
    """``record[key]`` as ``kind`` (int: a true integer, not a bool; float: any real number)."""
    if key not in record:
        raise ValueError(f"missing {key!r}")
    value = record[key]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{key!r} is {value!r}, expected {kind.__name__}")
    return value


@dataclass(frozen=True)
class Pruning:
    """HetLoRA's self-pruning instruction: train with the rank-tail penalty lambda and prune to
    ``hetfed.rank_pruning.pruned_rank(rank, gamma, min_rank)`` when the tail shrank."""

    gamma: float
    lam: float
    min_rank: int


@dataclass(frozen=True)
class TrainInstruction:
    """What a client is told to train (the arrays travel beside it)."""

    server_round: int
    rank: int
    lora_alpha: float
    lora_rslora: bool
    lora_scaling: float  # s_k, the scaling the server reads the reply's product at
    seed: int  # the round's seed; the client adds its id (hetfed.seeds.local_seed)
    layers: tuple[int, ...] | None = None  # None: every block
    frozen: tuple[str, ...] = ()
    personal: tuple[str, ...] = ()
    personal_key: str = ""
    pruning: Pruning | None = None
    local_steps: int | None = None  # None: the run's train.local-steps
    fault: str | None = None  # hetfed.faults: misbehave on purpose (tests and experiments)
    fault_seconds: float = 0.0

    def to_record(self) -> ConfigRecord:
        record: dict[str, Any] = {
            SERVER_ROUND: self.server_round,
            RANK: self.rank,
            LORA_ALPHA: float(self.lora_alpha),
            LORA_RSLORA: self.lora_rslora,
            LORA_SCALING: float(self.lora_scaling),
            SEED: self.seed,
        }
        if self.layers is not None:
            record[LAYERS] = sorted(self.layers)
        if self.frozen:
            record[FROZEN] = list(self.frozen)
        if self.personal:
            record |= {PERSONAL: list(self.personal), PERSONAL_KEY: self.personal_key}
        if self.pruning is not None:
            record |= {
                PRUNE_GAMMA: self.pruning.gamma,
                PRUNE_LAMBDA: self.pruning.lam,
                PRUNE_MIN_RANK: self.pruning.min_rank,
            }
        if self.local_steps is not None:
            record[LOCAL_STEPS] = self.local_steps
        if self.fault is not None:
            record |= {FAULT: self.fault, FAULT_SECONDS: self.fault_seconds}
        return ConfigRecord(record)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainInstruction:
        pruning = None
        if PRUNE_GAMMA in record:
            pruning = Pruning(
                _get(record, PRUNE_GAMMA, float),
                _get(record, PRUNE_LAMBDA, float),
                _get(record, PRUNE_MIN_RANK, int),
            )
        return cls(
            server_round=_get(record, SERVER_ROUND, int),
            rank=_get(record, RANK, int),
            lora_alpha=_get(record, LORA_ALPHA, float),
            lora_rslora=_get(record, LORA_RSLORA, bool),
            lora_scaling=_get(record, LORA_SCALING, float),
            seed=_get(record, SEED, int),
            layers=tuple(int(i) for i in record[LAYERS]) if LAYERS in record else None,
            frozen=tuple(str(f) for f in record[FROZEN]) if FROZEN in record else (),
            personal=tuple(str(f) for f in record[PERSONAL]) if PERSONAL in record else (),
            personal_key=_get(record, PERSONAL_KEY, str) if PERSONAL in record else "",
            pruning=pruning,
            local_steps=_get(record, LOCAL_STEPS, int) if LOCAL_STEPS in record else None,
            fault=str(record[FAULT]) if FAULT in record else None,
            fault_seconds=_get(record, FAULT_SECONDS, float) if FAULT in record else 0.0,
        )


@dataclass(frozen=True)
class EvaluateReply:
    """The metrics of a federated evaluation reply: the global model on the client's held-out
    split of the round (:meth:`hetfed.config.RunSettings.client_splits`) and, where it scored
    its local test split too, the figures there."""

    num_examples: int
    accuracy: float
    loss: float
    test_accuracy: float | None = None
    test_loss: float | None = None

    def to_record(self) -> MetricRecord:
        record = {NUM_EXAMPLES: self.num_examples, ACCURACY: self.accuracy, LOSS: self.loss}
        if self.test_accuracy is not None:
            record |= {TEST_ACCURACY: self.test_accuracy, TEST_LOSS: self.test_loss}
        return MetricRecord(record)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvaluateReply:
        """The reply's figures: a count >= 1, accuracies in [0, 1] and finite losses."""
        on_test = (
            (float(record[TEST_ACCURACY]), float(record[TEST_LOSS]))
            if TEST_ACCURACY in record
            else (None, None)
        )
        reply = cls(
            int(record[NUM_EXAMPLES]), float(record[ACCURACY]), float(record[LOSS]), *on_test
        )
        scores = [(reply.accuracy, reply.loss)] + ([on_test] if on_test[0] is not None else [])
        if reply.num_examples < 1 or not all(
            0 <= accuracy <= 1 and math.isfinite(loss) for accuracy, loss in scores
        ):
            raise ValueError(f"evaluate reply out of range: {reply}")
        return reply


@dataclass(frozen=True)
class TrainReply:
    """The metrics of a training reply; ``rank`` is the rank the client actually returns."""

    num_examples: int
    train_loss: float
    rank: int
    seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0

    def to_record(self) -> MetricRecord:
        return MetricRecord(
            {
                NUM_EXAMPLES: self.num_examples,
                TRAIN_LOSS: float(self.train_loss),
                RANK: self.rank,
                SECONDS: float(self.seconds),
                BYTES_DOWN: self.bytes_down,
                BYTES_UP: self.bytes_up,
            }
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainReply:
        """The reply's figures; the three the server needs must be there and be numbers."""
        try:
            return cls(
                num_examples=int(record[NUM_EXAMPLES]),
                train_loss=float(record[TRAIN_LOSS]),
                rank=int(record[RANK]),
                seconds=float(record.get(SECONDS, 0.0)),
                bytes_down=int(record.get(BYTES_DOWN, 0)),
                bytes_up=int(record.get(BYTES_UP, 0)),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"missing or malformed {err}") from err


@dataclass(frozen=True)
class BudgetReply:
    """A node's answer to the budget query: its tier, the rank it affords and its client id."""

    tier: str
    rank: int
    client_id: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({TIER: self.tier, RANK: self.rank, CLIENT_ID: self.client_id})

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> BudgetReply:
        if TIER not in record:
            raise ValueError(f"malformed budget reply (missing {TIER!r})")
        return cls(str(record[TIER]), _get(record, RANK, int), _get(record, CLIENT_ID, int))


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def nbytes(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(value.nbytes for value in state.values()))


def train_content(state: Mapping[str, np.ndarray], instruction: TrainInstruction) -> RecordDict:
    """A train message's content: the adapter arrays and the instruction."""
    return RecordDict({ARRAYS: to_record(state), CONFIG: instruction.to_record()})


def reply_content(state: Mapping[str, np.ndarray], reply: TrainReply) -> RecordDict:
    """A training reply's content: the trained arrays and the metrics."""
    return RecordDict({ARRAYS: to_record(state), METRICS: reply.to_record()})
