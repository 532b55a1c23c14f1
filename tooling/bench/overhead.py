"""Item 2: framework overhead, the wall time of the training part of simulated rounds (the
``train_seconds`` of ``metrics.jsonl``, through ``hetfed run`` and Flower's Simulation Engine)
against the sum of the bare local training steps of the same clients, as a ratio."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from client_apps.local_training import TrainJob, received_spec
from hetfed import adapter_state
from hetfed.errors import HetfedError
from hetfed.results import read_metrics
from hetfed.training import train_steps
from tooling import scenarios
from tooling.bench.common import DEFAULT_OUT, client_workload, isolated, partition_of, quiet_flower


def plain_training_seconds(
    scenario: str | Path, rounds: int, threads: int
) -> dict[int, list[float]]:
    """Seconds of the bare local training steps of every client of rounds 1..``rounds``.

    The same clients, ranks, data, local steps and seeds as the simulated run (the strategy's
    sampling is seeded): for each train message its adapter is loaded into one peft-wrapped base
    model (not timed), then only :func:`hetfed.training.train_steps` (forward, backward, AdamW)
    is timed, with ``threads`` torch threads. Returns the seconds per client by round.
    """
    torch.set_num_threads(threads)
    with quiet_flower():
        workload = client_workload(scenario, rounds=rounds)
    settings = workload.settings
    seconds: dict[int, list[float]] = {}
    for server_round, msg, context in workload.calls:
        job = TrainJob.from_message(msg, context)
        received = adapter_state.trainable(job.received)
        model = workload.host.set_state(received_spec(job.instruction, settings), received)
        data = partition_of(settings, context)
        result = train_steps(model, data, settings.train, seed=job.seed)
        seconds.setdefault(server_round, []).append(result.seconds)
    return seconds


def overhead_ratios(
    simulated: dict[int, float], plain: dict[int, list[float]]
) -> dict[str, float | None]:
    """train_seconds / sum of the plain steps, over all rounds and over rounds 2.. (warm: the
    first round also loads the base model and the data in the workers and asks the budgets)."""
    later = [r for r in simulated if r > 1]

    def ratio(rounds: Iterable[int]) -> float | None:
        rounds = list(rounds)
        bare = sum(sum(plain[r]) for r in rounds)
        return sum(simulated[r] for r in rounds) / bare if rounds else None

    return {"all_rounds": ratio(simulated), "rounds_2_on": ratio(later)}


def framework_overhead(
    scenario: str | Path,
    rounds: int = 3,
    cpus: int = 1,
    work_dir: str | Path = DEFAULT_OUT.parent / "overhead",
) -> dict[str, Any]:
    """Framework overhead: the training part of simulated rounds against the bare steps.

    Runs a variant of the scenario (:func:`scenario_variant` in ``work_dir/scenario``:
    ``rounds`` rounds, results in ``work_dir/run``, one Ray worker with ``cpus`` CPUs:
    client-resources-num-cpus = init-args-num-cpus = ``cpus``) with ``hetfed run`` through
    Flower's Simulation Engine, and reads each round's ``train_seconds`` (configure_train start
    to aggregate_train end: sampling, messages, the SuperLink, Ray, the ClientApp, validation,
    aggregation). Then :func:`plain_training_seconds` times the bare steps of the same clients
    with ``cpus`` torch threads, in a process of its own. ratio = train_seconds / sum of the
    bare steps (target <= 1.15), over all rounds and over rounds 2.. The run's log is
    ``work_dir/flwr-run.log``; the run uses this environment's FLWR_* variables (FLWR_HOME,
    FLWR_LOCAL_*_PORT) as ``hetfed run`` does.
    """
    work_dir = Path(work_dir).resolve()
    run_dir = work_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    variant = scenarios.write_variant(
        scenario,
        work_dir / "scenario",
        {"num-server-rounds": rounds, "results-dir": str(run_dir)},
        {"client-resources-num-cpus": cpus, "init-args-num-cpus": cpus},
    )
    log_path = work_dir / "flwr-run.log"
    started = time.perf_counter()
    with log_path.open("w") as log, contextlib.redirect_stdout(log):
        code = scenarios.run(variant, [])
    wall = time.perf_counter() - started
    if code != 0:
        raise HetfedError(f"the simulated run failed (exit code {code}); see {log_path}")
    records = read_metrics(run_dir)
    simulated = {r["round"]: r["train_seconds"] for r in records if r["round"] > 0}
    plain = isolated(plain_training_seconds, variant, rounds, cpus)
    return {
        "scenario": str(scenario),
        "cpus": cpus,
        "run_seconds": wall,
        "rounds": [
            {
                "round": r,
                "clients": len(plain[r]),
                "train_seconds": simulated[r],
                "plain_steps_seconds": sum(plain[r]),
                "ratio": simulated[r] / sum(plain[r]),
            }
            for r in sorted(simulated)
        ],
        "ratio": overhead_ratios(simulated, plain),
        "log": str(log_path),
    }
