"""Failure injection, for testing and experiments (``faults.*``): both halves in one place.

The server chooses (:func:`choose_faults`): each round (and retry attempt) ``round(fraction x
sampled)`` clients, seeded, each told one kind from ``faults.kinds`` in its train instruction.
The client misbehaves (:func:`fault_injection`, a Flower client mod on the ClientApp's train
function): it raises, replies after the round timeout, or replies with garbage built from the
arrays it was sent (a NaN, a wrong shape, a missing array) instead of training. The mod passes
every message straight to training unless the run configures faults, so a device's train path
never sees them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context, Message, RecordDict

from hetfed import adapter_state, seeds, wire

if TYPE_CHECKING:
    from hetfed.config import FaultSettings


def choose_faults(
    faults: FaultSettings, seed: int, server_round: int, attempt: int, clients: list[int]
) -> dict[int, str]:
    """Which of the sampled ``clients`` misbehave this attempt, and how (seeded)."""
    if faults.fraction == 0 or not clients:
        return {}
    rng = seeds.fault_rng(seed, server_round, attempt)
    count = round(faults.fraction * len(clients))
    chosen = sorted(rng.choice(len(clients), size=count, replace=False))
    kinds = faults.kind_list()
    return {clients[i]: kinds[rng.integers(len(kinds))] for i in chosen}


def injected_fault(msg: Message, fault: str, wait_seconds: float) -> Message:
    """Misbehave as ``fault`` says: raise, reply ``wait_seconds`` late, or reply with garbage
    built from the sent arrays (no training)."""
    if fault == "raise":
        raise RuntimeError("injected fault: this client raises")
    config = msg.content[wire.CONFIG]
    arrays = adapter_state.trainable(wire.from_record(msg.content[wire.ARRAYS]))
    if wire.LAYERS in config:
        arrays = adapter_state.restrict_to_layers(arrays, [int(i) for i in config[wire.LAYERS]])
    first = sorted(arrays)[0]
    if fault == "timeout":
        time.sleep(wait_seconds)
    elif fault == "nan":
        arrays[first] = np.full_like(arrays[first], np.nan)
    elif fault == "shape":
        arrays[first] = np.concatenate([arrays[first], arrays[first][:1]])
    elif fault == "missing-key":
        del arrays[first]
    metrics = wire.TrainReply(num_examples=1, train_loss=0.0, rank=int(config[wire.RANK]))
    content = RecordDict({wire.ARRAYS: wire.to_record(arrays), wire.METRICS: metrics.to_record()})
    return Message(content, reply_to=msg)


def fault_injection(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Client mod: misbehave when the run configures faults and the server says so."""
    # imported here: the ClientApp's module imports this mod, and hetfed.config brings
    # PyTorch and transformers, which a budget query must not import
    from hetfed.config import parse_run_config

    settings, _ = parse_run_config(context.run_config, strict=False)
    config = msg.content[wire.CONFIG]
    if settings.faults.fraction > 0 and wire.FAULT in config:
        return injected_fault(msg, str(config[wire.FAULT]), float(config[wire.FAULT_SECONDS]))
    return call_next(msg, context)
