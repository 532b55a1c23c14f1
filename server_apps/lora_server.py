"""The hetfed ServerApp: build the strategy by name, run the rounds, evaluate, write results.

Before any training it validates the whole run (:func:`hetfed.run_plan.plan_run`). Each round
the global adapter is evaluated centrally on the held-out test split, and a line is appended to
``<results-dir>/metrics.jsonl``. At the end it writes ``summary.json``, ``accuracy.png`` and the
global adapter as a standard PEFT folder ``adapter/``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.config import get_project_dir
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from hetfed import wire
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.data import load_splits
from hetfed.models import build_classifier
from hetfed.results import ResultsWriter, RoundRecord
from hetfed.run_plan import plan_run
from hetfed.training import encode, evaluate

app = ServerApp()


def _project_dir(grid: Grid) -> Path | None:
    run = grid.run
    if not run.fab_id:
        return None
    return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = plan_run(context.run_config, _project_dir(grid))
    settings = plan.settings
    strategy = plan.build_strategy()
    writer = ResultsWriter(settings.results_dir)
    log(
        INFO,
        "[hetfed] strategy %s, %d rounds, results in %s",
        strategy.describe(),
        settings.num_server_rounds,
        writer.folder,
    )

    splits = load_splits(settings.data)
    model, tokenizer = build_classifier(settings.model, len(splits.label_names), settings.seed)
    host = AdapterHost(model, settings.model.name)
    test = encode(
        list(splits.test["text"]), list(splits.test["label"]), tokenizer, settings.model.max_length
    )
    global_spec = LoraSpec(
        strategy.global_rank(),
        strategy.client_alpha(strategy.global_rank()),
        settings.lora.modules(),
        settings.lora.dropout,
    )
    initial = host.initial_state(global_spec, seed=settings.seed)
    run_started = last_time = time.perf_counter()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal last_time
        with host.lock:
            accuracy, loss = evaluate(
                host.set_state(global_spec, wire.from_record(arrays)),
                test,
                settings.train.eval_batch_size,
            )
        now = time.perf_counter()
        stats = strategy.stats.get(server_round)
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            sampled=stats.sampled if stats else 0,
            replied=stats.replied if stats else 0,
            failed=stats.failed if stats else 0,
            bytes_down=stats.bytes_down if stats else 0,
            bytes_up=stats.bytes_up if stats else 0,
            train_loss=stats.train_loss if stats else None,
            seconds=now - last_time,
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

    result = strategy.start(
        grid=grid,
        initial_arrays=wire.to_record(initial),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=evaluate_global,
    )
    final_state = wire.from_record(result.arrays) if len(result.arrays) else initial
    final = writer.records[-1]
    adapter_dir = host.export(
        global_spec,
        final_state,
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
            "seconds": time.perf_counter() - run_started,
            "global_rank": global_spec.rank,
            "tiers": {name: tier.rank for name, tier in plan.profiles.tiers.items()},
            "node_budgets": dict(sorted((str(k), v.tier) for k, v in strategy.budgets.items())),
            "adapter": str(adapter_dir),
            "settings": asdict(settings),
        }
    )
    log(INFO, "[hetfed] done: final accuracy %.4f; results in %s", final.accuracy, writer.folder)
