"""The hetfed ServerApp: build the strategy by name, run the rounds, evaluate, write results.

Before any training it validates the whole run (:func:`server_apps.run_plan.plan_run`, and a
checkpoint to resume from). Each round the global adapter is evaluated centrally on the held-out
test split, a line is appended to ``<results-dir>/metrics.jsonl`` and ``checkpoint.npz`` is
replaced (:mod:`hetfed.checkpoint`). At the end it writes ``summary.json``, ``accuracy.png`` and
the global adapter as a standard PEFT folder ``adapter/``; a resumed run whose checkpoint
already holds the last round writes them again from it without training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.config import get_project_dir
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from hetfed import adapter_state, metrics, wire
from hetfed import lora_algebra as la
from hetfed.adapter_state import State
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.checkpoint import Checkpoint, save_checkpoint
from hetfed.data import load_splits
from hetfed.data_config import TEST
from hetfed.generation import Evaluation
from hetfed.models import GENERATION, build_model, on_compute_device
from hetfed.results import ResultsWriter, RoundRecord, RoundStats, last_rounds_mean
from hetfed.server_model import ServerModel
from hetfed.training import Encoded, encode_split
from server_apps.run_plan import RunPlan, plan_run
from strategies.base import LoRAStrategy

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
    pairs, head = adapter_state.split_state(state)
    factors = {
        module: la.low_rank_factors(deltas.get(module, 0) + spec.scaling * (b @ a))
        for module, (b, a) in pairs.items()
    }
    rank = max(a.shape[0] for _, a in factors.values())
    padded = {module: la.pad(b, a, rank) for module, (b, a) in factors.items()}
    merged = replace(spec, rank=rank, alpha=float(rank), rslora=False)
    return merged, adapter_state.join_state(padded, head)


def export_global(
    strategy: LoRAStrategy, host: AdapterHost, state: State, folder: Path, extra: dict
) -> Path:
    """Write the model the server evaluates (the strategy's view of the global ``state``) as a
    PEFT folder; it needs nothing from a training round, so a checkpoint exports as it is."""
    return host.export(*merged_adapter(*strategy.model_view(state)), folder, extra)


@dataclass
class ServerRun:
    """One ServerApp run: what :func:`build` made, and the bookkeeping of its rounds."""

    plan: RunPlan
    strategy: LoRAStrategy
    server: ServerModel
    writer: ResultsWriter
    label_names: list[str]
    run_config: dict
    started: float = field(default_factory=time.perf_counter)
    last_round_end: float = field(default_factory=time.perf_counter)
    final_test: Evaluation | None = None  # the final model on the test split

    @property
    def checkpoint(self) -> Checkpoint | None:
        return self.plan.checkpoint

    def seconds(self) -> float:
        """Wall time of the run so far, the time before a resume included."""
        before = self.checkpoint.seconds if self.checkpoint is not None else 0.0
        return before + time.perf_counter() - self.started

    def node_budgets(self) -> dict[str, str]:
        """Each client's tier: this process's budget replies over the checkpoint's."""
        before = self.checkpoint.node_budgets if self.checkpoint is not None else {}
        current = {str(k): v.tier for k, v in self.strategy.budgets.items()}
        return dict(sorted({**before, **current}.items()))

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation of the global model; a line in metrics.jsonl and in the log."""
        strategy, settings = self.strategy, self.plan.settings
        view = strategy.model_view(wire.from_record(arrays))
        split = self.server.evaluated_split
        evaluation = self.server.evaluate(*view, split=split)
        test = None
        if settings.scores_test(server_round):  # report only
            test = evaluation if split == TEST else self.server.evaluate(*view, split=TEST)
        if server_round == settings.num_server_rounds:  # the final model
            self.final_test = test
        now = time.perf_counter()
        stats = strategy.stats.get(server_round, RoundStats())
        before = self.writer.records[-1].simulated_total if self.writer.records else 0.0
        record = stats.record(
            server_round,
            evaluation,
            split,
            now - self.last_round_end,
            before,
            test,
            settings.client_split,
        )
        self.last_round_end = now
        self.writer.add_round(record)
        log(
            INFO,
            "[hetfed] round %d/%d  %s %s  replied %d/%d  down %.2f MB  up %.2f MB  %.1f s",
            server_round,
            settings.num_server_rounds,
            split,
            metrics.describe(record),
            record.replied,
            record.sampled,
            record.bytes_down / 1e6,
            record.bytes_up / 1e6,
            record.seconds,
        )
        return MetricRecord({"accuracy": record.accuracy, "loss": record.loss})

    def save(self, server_round: int, arrays: ArrayRecord) -> None:
        """The checkpoint after a round (:mod:`hetfed.checkpoint`, replaced atomically)."""
        snapshot = Checkpoint(
            server_round=server_round,
            state=wire.from_record(arrays),
            strategy=self.strategy.name,
            strategy_state=self.strategy.state_dict(),
            records=[asdict(r) for r in self.writer.records],
            seconds=self.seconds(),
            run_config=self.run_config,
            node_budgets=self.node_budgets(),
        )
        save_checkpoint(self.writer.folder, snapshot)


def build(grid: Grid, context: Context) -> ServerRun:
    """Validate the run (before any weights load), then the model, the test and server splits,
    the strategy bound to them, and the results folder (with a resumed run's rounds)."""
    plan = plan_run(context.run_config, _project_dir(grid))
    settings, checkpoint = plan.settings, plan.checkpoint
    strategy = plan.build_strategy()
    if checkpoint is not None:
        log(INFO, "[hetfed] resuming after round %d from %s", checkpoint.server_round,
            plan.resume_from)  # fmt: skip
        if checkpoint.server_round == settings.num_server_rounds:
            log(INFO, "[hetfed] nothing left to train: round %d is the last; writing the "
                "results again", checkpoint.server_round)  # fmt: skip
    elif plan.resume_from is not None:
        log(WARNING, "[hetfed] resume: no checkpoint in %s; starting at round 1", plan.resume_from)
    done = [RoundRecord(**r) for r in checkpoint.records] if checkpoint is not None else []
    writer = ResultsWriter(settings.results_dir, done)
    writer.write_process(context.run_id)
    log(INFO, "[hetfed] strategy %s, %d rounds, results in %s", strategy.describe(),
        settings.num_server_rounds, writer.folder)  # fmt: skip
    splits = load_splits(settings.data)
    model, tokenizer = build_model(settings.model, len(splits.label_names), settings.seed)
    model = on_compute_device(model, settings.model)  # evaluation, server-side training

    def tokenized(dataset) -> Encoded:
        return encode_split(settings.model, dataset, splits.label_names, tokenizer)

    def targets(dataset) -> list[str] | None:
        return list(dataset["target"]) if settings.model.task == GENERATION else None

    public = tokenized(splits.server) if splits.server is not None else None
    validation = tokenized(splits.validation) if splits.validation is not None else None
    server = ServerModel(
        settings,
        AdapterHost(model),
        tokenized(splits.test),
        public,
        tokenizer,
        targets(splits.test),
        validation,
        targets(splits.validation) if validation is not None else None,
    )
    strategy.bind(server)
    return ServerRun(plan, strategy, server, writer, splits.label_names, dict(context.run_config))


def run(job: ServerRun, grid: Grid) -> State:
    """The rounds, from round 1 or after the checkpoint's last; the final global state."""
    settings, checkpoint, strategy = job.plan.settings, job.checkpoint, job.strategy
    if checkpoint is not None:
        strategy.load_state_dict(checkpoint.strategy_state)
        start_state, first_round = checkpoint.state, checkpoint.server_round + 1
    else:
        start_state, first_round = strategy.initial_state(), 1
    result = strategy.start(
        grid=grid,
        initial_arrays=wire.to_record(start_state),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=job.evaluate,
        first_round=first_round,
        on_round_end=job.save,
    )
    return wire.from_record(result.arrays)


def final_test(job: ServerRun, state: State) -> Evaluation:
    """The final model on the test split: evaluated in the last round, or now (a run that
    resumed after its last round)."""
    if job.final_test is None:
        job.final_test = job.server.evaluate(*job.strategy.model_view(state), split=TEST)
    return job.final_test


def export(job: ServerRun, state: State, test: Evaluation) -> Path:
    """The global model as a PEFT folder ``adapter/`` (:func:`export_global`)."""
    extra = {
        "model": asdict(job.plan.settings.model),
        "label_names": job.label_names,
        "final_accuracy": test.accuracy,
    }
    return export_global(job.strategy, job.server.host, state, job.writer.folder / "adapter", extra)


def summarize(job: ServerRun, adapter_dir: Path, test: Evaluation) -> None:
    """``summary.json``, ``accuracy.png`` and, for the generation task, ``generations.jsonl``
    (the final model's greedy generations of the evaluated test examples).

    ``final_*`` is the final model on the test split; ``best_*`` and ``initial_accuracy`` are
    read on the split every round was evaluated on (``evaluated_on``: validation when the run
    has one, so nothing is chosen on the test split)."""
    settings, strategy, records = job.plan.settings, job.strategy, job.writer.records
    final = records[-1]
    if test.generations:
        job.writer.write_generations(test.generations, job.server.references)
    job.writer.write_test_examples(test.examples())
    job.writer.plot(f"{strategy.name} on {settings.data.source} ({settings.model.name})")
    job.writer.write_summary(
        {
            "strategy": strategy.describe(),
            **metrics.final_and_best(test, records),
            # the mean test accuracy of the last test-rounds rounds' global models
            "last_rounds_accuracy": last_rounds_mean(records, settings.test_rounds),
            "test_rounds": settings.test_rounds,
            "evaluated_on": job.server.evaluated_split,
            "initial_accuracy": records[0].accuracy,
            # federated evaluation of the final model on the clients' test splits
            # (fraction-evaluate; else None), and the split every round was evaluated on there
            **metrics.final_client_figures(final),
            "client_evaluated_on": final.client_split,
            "rounds": settings.num_server_rounds,
            "bytes_down": sum(r.bytes_down for r in records),
            "bytes_up": sum(r.bytes_up for r in records),
            "failed_replies": sum(r.failed for r in records),
            "rejected_replies": sum(r.rejected for r in records),
            "skipped_rounds": [r.round for r in records if r.skipped],
            "resumed_after_round": job.checkpoint.server_round if job.checkpoint else None,
            "seconds": job.seconds(),
            "simulated_seconds": final.simulated_total,
            "stragglers": sum(r.stragglers for r in records),
            "pruned_replies": sum(r.pruned for r in records),
            "global_rank": strategy.global_rank(),
            "tiers": {name: tier.rank for name, tier in job.plan.profiles.tiers.items()},
            "node_budgets": job.node_budgets(),
            "adapter": str(adapter_dir),
            "settings": asdict(settings),
        }
    )
    log(
        INFO, "[hetfed] done: final test accuracy %.4f; results in %s", test.accuracy,
        job.writer.folder,
    )  # fmt: skip


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build, run the rounds, export the global adapter, summarize."""
    job = build(grid, context)
    state = run(job, grid)
    test = final_test(job, state)
    summarize(job, export(job, state, test), test)
