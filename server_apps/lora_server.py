"""The hetfed ServerApp: build the strategy by name, run the rounds, evaluate, write results.

Before any training it validates the whole run (:func:`hetfed.run_plan.plan_run`, and a
checkpoint to resume from). Each round the global adapter is evaluated centrally on the held-out
test split, a line is appended to ``<results-dir>/metrics.jsonl`` and ``checkpoint.npz`` is
replaced (:mod:`hetfed.checkpoint`). At the end it writes ``summary.json``, ``accuracy.png`` and
the global adapter as a standard PEFT folder ``adapter/``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.config import get_project_dir
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from hetfed import lora_algebra as la
from hetfed import wire
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.checkpoint import Checkpoint, save_checkpoint
from hetfed.data import load_splits
from hetfed.models import build_model, compute_device
from hetfed.results import ResultsWriter, RoundRecord
from hetfed.run_plan import plan_run
from hetfed.server_model import ServerModel
from hetfed.training import Encoded, encode_for_task
from hetfed.wire import State
from strategies.base import RoundStats

app = ServerApp()


def _project_dir(grid: Grid) -> Path | None:
    run = grid.run
    if not run.fab_id:
        return None
    return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)


def merged_adapter(spec: LoraSpec, state: State, deltas: State) -> tuple[LoraSpec, State]:
    """Fold dense base deltas into an equivalent LoRA adapter (scaling 1) for export.

    Methods that merge updates into the base weights (FLoRA) have no adapter of their own; the
    exported one reproduces ``W0 + delta + s B A`` exactly, at the numerical rank of the sum.
    """
    if not deltas:
        return spec, state
    pairs, head = wire.split_state(state)
    factors = {
        module: la.low_rank_factors(deltas.get(module, 0) + spec.scaling * (b @ a))
        for module, (b, a) in pairs.items()
    }
    rank = max(a.shape[0] for _, a in factors.values())
    padded = {module: la.pad(b, a, rank) for module, (b, a) in factors.items()}
    return replace(spec, rank=rank, alpha=float(rank), rslora=False), wire.join_state(padded, head)


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = plan_run(context.run_config, _project_dir(grid))
    settings = plan.settings
    strategy = plan.build_strategy()
    checkpoint = plan.checkpoint
    if checkpoint is not None:
        log(
            INFO,
            "[hetfed] resuming after round %d from %s",
            checkpoint.server_round,
            plan.resume_from,
        )
    elif plan.resume_from is not None:
        log(WARNING, "[hetfed] resume: no checkpoint in %s; starting at round 1", plan.resume_from)
    done = [RoundRecord(**r) for r in checkpoint.records] if checkpoint is not None else []
    writer = ResultsWriter(settings.results_dir, done)
    log(
        INFO,
        "[hetfed] strategy %s, %d rounds, results in %s",
        strategy.describe(),
        settings.num_server_rounds,
        writer.folder,
    )

    splits = load_splits(settings.data)
    model, tokenizer = build_model(settings.model, len(splits.label_names), settings.seed)
    model.to(compute_device())  # evaluation and server-side training run there

    def tokenized(dataset) -> Encoded:
        return encode_for_task(
            settings.model,
            list(dataset["text"]),
            list(dataset["label"]),
            splits.label_names,
            tokenizer,
        )

    server = ServerModel(
        settings,
        AdapterHost(model),
        tokenized(splits.test),
        tokenized(splits.server) if splits.server is not None else None,
        splits.label_names,
    )
    strategy.bind(server)
    run_started = last_time = time.perf_counter()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal last_time
        accuracy, loss = server.evaluate(*strategy.model_view(wire.from_record(arrays)))
        now = time.perf_counter()
        stats = strategy.stats.get(server_round, RoundStats())
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            sampled=stats.sampled,
            replied=stats.replied,
            failed=stats.failed,
            rejected=stats.rejected,
            attempts=stats.attempts,
            skipped=stats.skipped,
            bytes_down=stats.bytes_down,
            bytes_up=stats.bytes_up,
            train_loss=stats.train_loss,
            seconds=now - last_time,
            train_seconds=stats.train_seconds,
        )
        last_time = now
        writer.add_round(record)
        log(
            INFO,
            "[hetfed] round %d/%d  accuracy %.4f  loss %.4f  replied %d/%d  "
            "down %.2f MB  up %.2f MB  %.1f s",
            server_round,
            settings.num_server_rounds,
            accuracy,
            loss,
            record.replied,
            record.sampled,
            record.bytes_down / 1e6,
            record.bytes_up / 1e6,
            record.seconds,
        )
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    spent_before = 0.0
    if checkpoint is not None:
        strategy.load_state_dict(checkpoint.strategy_state)
        start_state, first_round = checkpoint.state, checkpoint.server_round + 1
        spent_before = checkpoint.seconds
    else:
        start_state, first_round = strategy.initial_state(), 1

    def save(server_round: int, arrays: ArrayRecord) -> None:
        snapshot = Checkpoint(
            server_round=server_round,
            state=wire.from_record(arrays),
            strategy=strategy.name,
            strategy_state=strategy.state_dict(),
            records=[asdict(r) for r in writer.records],
            seconds=spent_before + time.perf_counter() - run_started,
            run_config=dict(context.run_config),
        )
        save_checkpoint(writer.folder, snapshot)

    result = strategy.start(
        grid=grid,
        initial_arrays=wire.to_record(start_state),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=evaluate_global,
        first_round=first_round,
        on_round_end=save,
    )
    final_state = wire.from_record(result.arrays)
    final = writer.records[-1]
    export_spec, export_state = merged_adapter(*strategy.model_view(final_state))
    with server.host.lock:
        server.host.set_base_deltas({})  # the exported adapter is relative to the pristine base
        adapter_dir = server.host.export(
            export_spec,
            export_state,
            writer.folder / "adapter",
            extra={
                "model": asdict(settings.model),
                "label_names": splits.label_names,
                "final_accuracy": final.accuracy,
            },
        )
    writer.plot(f"{strategy.name} on {settings.data.source} ({settings.model.name})")
    writer.write_summary(
        {
            "strategy": strategy.describe(),
            "final_accuracy": final.accuracy,
            "best_accuracy": max(r.accuracy for r in writer.records),
            "initial_accuracy": writer.records[0].accuracy,
            "rounds": settings.num_server_rounds,
            "bytes_down": sum(r.bytes_down for r in writer.records),
            "bytes_up": sum(r.bytes_up for r in writer.records),
            "failed_replies": sum(r.failed for r in writer.records),
            "rejected_replies": sum(r.rejected for r in writer.records),
            "skipped_rounds": [r.round for r in writer.records if r.skipped],
            "resumed_after_round": first_round - 1 if checkpoint is not None else None,
            "seconds": spent_before + time.perf_counter() - run_started,
            "global_rank": strategy.global_rank(),
            "tiers": {name: tier.rank for name, tier in plan.profiles.tiers.items()},
            "node_budgets": dict(sorted((str(k), v.tier) for k, v in strategy.budgets.items())),
            "adapter": str(adapter_dir),
            "settings": asdict(settings),
        }
    )
    log(INFO, "[hetfed] done: final accuracy %.4f; results in %s", final.accuracy, writer.folder)
