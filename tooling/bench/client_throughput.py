"""Item 1: client updates per second and peak memory of hetfed's ClientApp (one cached base
model per process, adapters swapped) against the naive pattern of Flower's LLM examples
(:func:`naive_train`: the base model rebuilt from disk and wrapped by peft on every call), on the
scenario's clients, each variant in its own process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict

from client_apps.local_training import TrainJob, received_spec
from client_apps.lora_client import train
from hetfed import adapter_state, wire
from hetfed.adapters import AdapterHost
from hetfed.config import parse_run_config
from hetfed.data import load_splits
from hetfed.models import build_classifier
from hetfed.training import train_steps
from tooling.bench.common import (
    act_as_flower_task,
    client_workload,
    isolated,
    partition_of,
    peak_rss_bytes,
    quiet_flower,
)


def naive_train(msg: Message, context: Context) -> Message:
    """A ClientApp train function in the pattern of Flower's LLM examples: every call builds the
    base model from disk (weights and tokenizer) and wraps it with peft, then loads the received
    adapter, trains and replies.

    It does the same work as hetfed's :func:`~client_apps.lora_client.train` (same adapter, data,
    local steps and seed) but keeps no model between calls; only the tokenized partitions are
    cached, as hetfed caches them, so that the comparison is about the model alone. Messages
    with more than plain LoRA training (rank pruning, layers, base deltas) are refused.
    """
    received = wire.from_record(msg.content[wire.ARRAYS])
    instruction = wire.TrainInstruction.from_record(msg.content[wire.CONFIG])
    extra = {
        "layers": instruction.layers is not None,
        "frozen factors": bool(instruction.frozen),
        "rank pruning": instruction.pruning is not None,
        "a fault": instruction.fault is not None,
        "base deltas": bool(adapter_state.base_deltas(received)),
    }
    if any(extra.values()):
        asked = [what for what, asks in extra.items() if asks]
        raise ValueError(f"naive_train trains plain LoRA only; the message asks for {asked}")
    settings, _ = parse_run_config(context.run_config, strict=False)
    num_labels = len(load_splits(settings.data).label_names)
    model, _ = build_classifier(settings.model, num_labels, seed=settings.seed)
    spec = received_spec(instruction, settings)
    host = AdapterHost(model)
    data = partition_of(settings, context)
    result = train_steps(
        host.set_state(spec, adapter_state.trainable(received)),
        data,
        settings.train,
        seed=TrainJob.from_message(msg, context).seed,
    )
    metrics = wire.TrainReply(len(data), result.loss, spec.rank).to_record()
    return Message(
        RecordDict({wire.ARRAYS: wire.to_record(host.get_state(spec)), wire.METRICS: metrics}),
        reply_to=msg,
    )


CLIENT_VARIANTS: dict[str, Callable[[Message, Context], Message]] = {
    "hetfed": train,
    "naive": naive_train,
}


def measure_client_calls(variant: str, calls: list[tuple[Message, Context]]) -> dict[str, Any]:
    """Run the calls through one variant's train function in this process; its figures.

    Timed from the first call to the last reply (imports excluded, the model's first load
    included); peak memory is this process's ``ru_maxrss``.
    """
    act_as_flower_task()
    train_function = CLIENT_VARIANTS[variant]
    seconds, losses = [], []
    with quiet_flower():
        for msg, context in calls:
            started = time.perf_counter()
            reply = train_function(msg, context)
            seconds.append(time.perf_counter() - started)
            losses.append(float(reply.content[wire.METRICS][wire.TRAIN_LOSS]))
    total = sum(seconds)
    return {
        "updates": len(calls),
        "seconds": total,
        "updates_per_second": len(calls) / total,
        "first_update_seconds": seconds[0],
        "later_update_seconds": float(np.mean(seconds[1:])) if len(seconds) > 1 else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "train_losses": losses,
    }


def client_throughput(scenario: str | Path, updates: int = 20) -> dict[str, Any]:
    """Client updates per second and peak memory: hetfed's ClientApp against the naive pattern.

    The workload is the scenario's (``hetfed bench``: the quickstart's all-MiniLM-L6-v2, BBC
    News, tiers, local steps and batch size, with zeropad) with every client sampled: the real
    train messages of round 1 (:func:`client_workload`) with the nodes' contexts, repeated in
    order until ``updates`` calls. Each variant runs all calls in its own fresh process
    (:func:`isolated`):
    ``hetfed`` calls the ClientApp's ``train`` (one cached base model, adapters swapped),
    ``naive`` calls :func:`naive_train` (the base model rebuilt on every call).

    updates/s = calls / (wall time from the first call to the last reply); peak memory is the
    process's peak RSS. ``speedup`` = updates/s of hetfed / of naive (target >= 2);
    ``max_train_loss_difference`` shows that both did the same work.
    """
    workload = client_workload(scenario, ["fraction-train=1.0"])
    calls = [(msg, context) for _, msg, context in workload.calls]
    calls = [calls[i % len(calls)] for i in range(updates)]
    variants = {
        variant: isolated(measure_client_calls, variant, calls) for variant in CLIENT_VARIANTS
    }
    hetfed, naive = variants["hetfed"], variants["naive"]
    return {
        "scenario": str(scenario),
        "settings": {
            "model": workload.settings.model.name,
            "data": workload.settings.data.source,
            "local_steps": workload.settings.train.local_steps,
            "batch_size": workload.settings.train.batch_size,
            "ranks": sorted({int(m.content[wire.CONFIG][wire.RANK]) for m, _ in calls}),
        },
        "variants": variants,
        "speedup": hetfed["updates_per_second"] / naive["updates_per_second"],
        "peak_rss_ratio_naive_over_hetfed": naive["peak_rss_bytes"] / hetfed["peak_rss_bytes"],
        "max_train_loss_difference": float(
            np.max(np.abs(np.subtract(hetfed["train_losses"], naive["train_losses"])))
        ),
    }
