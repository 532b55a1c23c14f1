"""Item 7: packed training (``simulation.packing``) against one client per actor, on the same
train jobs: client updates per second, peak memory and the base copies each needs.

The jobs are the real train messages of a scenario's strategy (every client of round 1, as
:func:`train_jobs` builds them) run with ``train.base-dropout = false``, which packing needs;
their ranks are those the scenario's tiers give, mixed. Each variant trains all of them in a
fresh process of its own (:func:`~tooling.bench.common.isolated`), so that its peak memory is
its own:

- ``one client per actor`` (the reference): every job trained alone
  (:func:`~client_apps.local_training.run_alone`), one after the other, as one Ray actor of a
  simulation trains its clients today. N such actors train N clients at once and hold N copies
  of the base, so the memory of k clients at once is k times this process's peak;
- ``packed k``: the same jobs through a :class:`~client_apps.packed_trainer.PackedTrainer`,
  handed to it k at a time from k threads (as k ClientApps waiting on the device's trainer),
  each k trained as one pack in one batched forward and backward pass over its one base.

Run as a module (``python -m tooling.bench.packing_cli --help``) it measures a scenario variant of
any model and number of clients, on this machine's device (the GPU script
``tooling/bench/packing_gpu.sh`` runs it for SmolLM2-135M and a larger local model).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord

from client_apps.local_training import JobResult, LocalWork, TrainJob, run_alone
from client_apps.packed_trainer import GATHER_SECONDS, PackedTrainer
from hetfed import wire
from hetfed.adapters import AdapterHost
from hetfed.config import RunSettings, SimulationSettings
from hetfed.data import load_splits
from hetfed.models import build_model, compute_device
from server_apps.run_plan import plan_run
from tooling import scenarios
from tooling.bench.common import (
    SimulatedNodes,
    act_as_flower_task,
    isolated,
    peak_rss_bytes,
    quiet_flower,
)
from tooling.bench.precision import SMOLLM2_WORKLOAD

REFERENCE = "one client per actor"
# What packing needs, and every client of the scenario sampled (one job each).
PACKING_CONFIG = {"fraction-train": 1.0, "train.base-dropout": False}
# model.task -> run-config overrides of the quickstart's data for a causal LM (python -m ...)
CAUSAL_WORKLOADS = {
    "instruction": {k: v for k, v in SMOLLM2_WORKLOAD.items() if k != "model.name"},
    "generation": {  # scenarios/smollm2-generation's task on BBC News (article -> its title)
        **{k: v for k, v in SMOLLM2_WORKLOAD.items() if k not in ("model.name", "model.prompt")},
        "model.task": "generation",
        "model.prompt": "Write a short headline for this news article.",
        "model.max-length": 96,
        "model.max-new-tokens": 20,
        "data.source": "bbc-news-headlines",
    },
}


def train_jobs(
    scenario: str | Path, config: dict[str, Any], updates: int | None = None
) -> tuple[RunSettings, list[TrainJob]]:
    """The train jobs of round 1 of the scenario with run-config values ``config`` set: the
    strategy's real ``configure_train`` over :class:`~tooling.bench.common.SimulatedNodes`
    (the scenario's num-supernodes), from the initial global adapter, each message turned into
    the :class:`~client_apps.local_training.TrainJob` its ClientApp hands to a trainer; taken in
    rank-interleaved order (:func:`interleave_ranks`) and repeated until ``updates`` jobs (None:
    each once). The base that makes the initial adapter is the task's (a causal LM for the
    instruction and generation tasks, where :func:`~tooling.bench.common.client_workload` builds
    a classifier)."""
    act_as_flower_task()
    run_config = {**scenarios.scenario_run_config(scenario, []), **config}
    plan = plan_run(run_config, project_dir=scenario)
    settings = plan.settings
    strategy = plan.build_strategy()
    nodes = SimulatedNodes(
        scenarios.simulation_settings(scenario)["num-supernodes"], run_config, settings.seed
    )
    num_labels = len(load_splits(settings.data).label_names)
    host = AdapterHost(build_model(settings.model, num_labels, settings.seed)[0])
    initial = wire.to_record(host.initial_state(strategy.global_spec(), seed=settings.seed))
    jobs = [
        TrainJob.from_message(msg, nodes.context(msg.metadata.dst_node_id))
        for msg in strategy.configure_train(1, initial, ConfigRecord(), nodes)
    ]
    jobs = interleave_ranks(jobs)
    if updates is not None:
        jobs = [jobs[i % len(jobs)] for i in range(updates)]
    return settings, jobs


def interleave_ranks(jobs: Sequence[TrainJob]) -> list[TrainJob]:
    """The jobs taken from each rank in turn (lowest rank first, each rank's in order), so that
    every pack of k consecutive jobs mixes the ranks the tiers give (the strategy sends them
    by partition, a tier's clients together)."""
    by_rank: dict[int, list[TrainJob]] = {}
    for job in jobs:
        by_rank.setdefault(job.instruction.rank, []).append(job)
    queues = [by_rank[rank] for rank in sorted(by_rank)]
    return [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]


def with_packing(jobs: Sequence[TrainJob], pack: int) -> list[TrainJob]:
    """The jobs of a run with ``simulation.packing = pack`` (the trainer's k)."""
    return [
        replace(job, settings=replace(job.settings, simulation=SimulationSettings(pack)))
        for job in jobs
    ]


def _train_all(jobs: Sequence[TrainJob], pack: int | None) -> tuple[list[JobResult], list[int]]:
    """Train ``jobs`` alone one after the other (``pack`` None), or through one packed trainer
    k = ``pack`` at a time from k threads; the results in job order, and the pack sizes."""
    if pack is None:
        return [run_alone(job) for job in jobs], [1] * len(jobs)
    trainer = PackedTrainer()
    results: list[JobResult] = []
    with ThreadPoolExecutor(pack) as pool:
        for first in range(0, len(jobs), pack):
            results += pool.map(trainer.train, jobs[first : first + pack])
    return results, list(trainer.sizes)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_packing_variant(jobs: list[TrainJob], pack: int | None, threads: int) -> dict[str, Any]:
    """Train ``jobs`` as one variant (:func:`_train_all`) in this process, with ``threads``
    torch threads; its figures.

    Before the clock starts: the base model is loaded and every client's partition tokenized
    (the process's caches, as a long-running actor has them), and the same jobs run once with
    one local step each (the same packs), so that every adapter a pack names exists and the
    device is warm. Timed: all jobs, from the first hand-over to the last result (for packs, the
    trainer's gathering time included, as in a simulation: it ends when k jobs are waiting, at
    most :data:`~client_apps.packed_trainer.GATHER_SECONDS` a pack; ``gathering_seconds`` is
    that bound summed). Peak memory:
    the process's ``ru_maxrss``, and on a GPU ``torch.cuda.max_memory_allocated`` (the base,
    the adapters, optimizer state and activations; the CUDA context is not in it).
    """
    torch.set_num_threads(threads)
    device = compute_device()
    with quiet_flower():  # the trainer logs every pack
        started = time.perf_counter()
        for job in jobs:
            LocalWork(job)  # the base model (once) and each client's tokenized partition
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        warm = [replace(j, instruction=replace(j.instruction, local_steps=1)) for j in jobs]
        _train_all(warm, pack)
        _synchronize(device)
        warmup_seconds = time.perf_counter() - started
        started = time.perf_counter()
        results, sizes = _train_all(jobs, pack)
        _synchronize(device)
        seconds = time.perf_counter() - started
    figures: dict[str, Any] = {
        "pack": pack or 1,
        "updates": len(jobs),
        "seconds": seconds,
        "updates_per_second": len(jobs) / seconds,
        "pack_sizes": sizes,
        # at most: the trainer stops gathering once k jobs are waiting
        "gathering_seconds": GATHER_SECONDS * len(sizes) if pack else 0.0,
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
        "device": str(device),
        "threads": threads,
        "peak_rss_bytes": peak_rss_bytes(),
        "train_losses": [r.train_loss for r in results],
    }
    if device.type == "cuda":
        figures["device_name"] = torch.cuda.get_device_name(device)
        figures["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        figures["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        figures["memory_bytes"] = figures["cuda_peak_allocated_bytes"]
        figures["memory"] = "GPU peak allocated"
    else:
        figures["memory_bytes"] = figures["peak_rss_bytes"]
        figures["memory"] = "peak RSS"
    return figures


def packing_throughput(
    scenario: str | Path,
    updates: int = 8,
    packs: Sequence[int] = (4, 8),
    threads: int = 1,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Updates/s and peak memory of one client per actor against packs of k, on the same jobs.

    The jobs (:func:`train_jobs`, ``updates`` of them: the scenario's round-1 clients, ranks
    interleaved) run with ``simulation.packing = k`` and ``train.base-dropout = false`` (and the
    values of ``config``); each variant in its own process (:func:`measure_packing_variant`):
    the reference first, then one per k in ``packs``.

    For a pack of k: ``updates_per_second_ratio`` = its updates/s / the reference's;
    ``memory_ratio`` = its peak / the reference process's peak (one actor, one client at a
    time); ``memory_ratio_same_concurrency`` = its peak / (k x the reference's peak), the k
    actors (k base copies) that train k clients at once without packing.
    ``max_train_loss_difference`` (against the reference, job by job) shows the same work.
    """
    config = {**PACKING_CONFIG, "simulation.packing": max(packs), **(config or {})}
    settings, jobs = train_jobs(scenario, config, updates)
    reference = isolated(measure_packing_variant, jobs, None, threads)
    reference.update(
        variant=REFERENCE,
        base_copies=1,
        base_copies_same_concurrency=1,
        updates_per_second_ratio=1.0,
        memory_ratio=1.0,
        memory_ratio_same_concurrency=1.0,
    )
    variants = [reference]
    for k in packs:
        packed = isolated(measure_packing_variant, with_packing(jobs, k), k, threads)
        actors_memory = k * reference["memory_bytes"]
        packed.update(
            variant=f"packed k={k}",
            base_copies=1,
            base_copies_same_concurrency=k,  # one client per actor: k actors, k bases
            same_concurrency_memory_bytes=actors_memory,
            updates_per_second_ratio=packed["updates_per_second"] / reference["updates_per_second"],
            memory_ratio=packed["memory_bytes"] / reference["memory_bytes"],
            memory_ratio_same_concurrency=packed["memory_bytes"] / actors_memory,
            max_train_loss_difference=float(
                np.max(np.abs(np.subtract(packed["train_losses"], reference["train_losses"])))
            ),
        )
        variants.append(packed)
    return {
        "scenario": str(scenario),
        "run_config": config,
        "settings": {
            "model": settings.model.name,
            "task": settings.model.task,
            "data": settings.data.source,
            "local_steps": settings.train.local_steps,
            "batch_size": settings.train.batch_size,
            "max_length": settings.model.max_length,
            "clients": len({job.client_id for job in jobs}),
            "ranks": sorted({job.instruction.rank for job in jobs}),
            "gather_seconds": GATHER_SECONDS,
        },
        "variants": variants,
    }
