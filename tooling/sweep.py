"""Sweeps: one scenario run over several strategies, options and seeds, compared in one table.

A sweep file (YAML)::

    scenario: scenarios/banking77-ranks     # relative to the sweep file
    seeds: [1, 2, 3]                        # optional (default [42]); each run once per seed
    target-accuracy: 0.5                    # optional, for "rounds to target"; or
                                            # target-rouge-l, target-perplexity (lower is better)
    baseline: fedit                         # optional; paired differences to this run
    runs:                                   # name -> run-config keys set for that run
      hetlora: {strategy: hetlora}
      helora-pad-zero: {strategy: helora-pad, helora-pad.filler: zero}

Each run is a real Flower run of a copy of the scenario whose config has the run's keys (so a
run may set options of its own strategy that the scenario does not name) and the seed. Results
go to ``<out>/<run>-seed<seed>/``; a run whose ``summary.json`` exists is not redone. At the end
the sweep writes ``comparison.csv`` (a row per run and seed), ``summary.csv`` and
``comparison.md`` (per run, the mean and 95% interval over the seeds, :mod:`tooling.stats`, and
the paired differences to the baseline) and ``accuracy.png``/``loss.png`` (the mean per round,
the interval shaded). A generation sweep's table and plot show ROUGE-L and perplexity in place of
exact match (``rouge_l.png``); a run not started yet is ``not run``, one that stopped without a
summary ``failed``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hetfed.errors import ConfigError
from hetfed.results import read_metrics
from tooling.scenarios import run, write_variant
from tooling.stats import Interval, mean_interval, paired_difference

# the sweep file's target keys: the metric of metrics.jsonl, whether lower is better, its range
TARGETS = {
    "target-accuracy": ("accuracy", False, "a number in (0, 1]"),
    "target-rouge-l": ("rouge_l", False, "a number in (0, 1]"),
    "target-perplexity": ("perplexity", True, "a number >= 1"),
}
SWEEP_KEYS = ("scenario", "seeds", *TARGETS, "baseline", "runs")


@dataclass(frozen=True)
class Sweep:
    scenario: Path
    runs: dict[str, dict[str, Any]]
    seeds: tuple[int, ...] = (42,)
    target: float | None = None  # the value of the target metric that counts as reached
    target_key: str = "target-accuracy"  # which one (TARGETS)
    baseline: str | None = None  # a run name: every run's paired difference to it


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; errors name the file, the key and the value."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError("sweep", source, "an existing YAML sweep file")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key in doc:
        if key not in SWEEP_KEYS:
            raise ConfigError(str(key), doc[key], f"keys {', '.join(SWEEP_KEYS)}", source)
    scenario = (path.parent / str(doc.get("scenario", ""))).resolve()
    if not (scenario / "pyproject.toml").is_file():
        raise ConfigError("scenario", doc.get("scenario"), "a scenario folder", source)
    runs = doc.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise ConfigError("runs", runs, "a mapping of run name to run-config keys", source)
    for name, keys in runs.items():
        if not isinstance(keys, dict):
            raise ConfigError(f"runs.{name}", keys, "a mapping of run-config keys", source)
    seeds = doc.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError("seeds", seeds, "a list of integers", source)
    targets = [key for key in TARGETS if key in doc]
    if len(targets) > 1:
        raise ConfigError(
            targets[1], doc[targets[1]], f"only one target key ({targets[0]} is set)", source
        )
    target_key = targets[0] if targets else "target-accuracy"
    target = doc.get(target_key)
    _, lower, allowed = TARGETS[target_key]
    in_range = isinstance(target, int | float) and (target >= 1 if lower else 0 < target <= 1)
    if target is not None and not in_range:
        raise ConfigError(target_key, target, allowed, source)
    baseline = doc.get("baseline")
    if baseline is not None and baseline not in runs:
        raise ConfigError("baseline", baseline, f"one of the runs: {', '.join(runs)}", source)
    runs = {str(k): dict(v) for k, v in runs.items()}
    return Sweep(scenario, runs, tuple(seeds), target, target_key, baseline)


def run_sweep(sweep: Sweep, out: str | Path) -> list[dict[str, Any]]:
    """Run every (run, seed) not finished yet (as ``hetfed run`` does), then write the
    comparison files."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for name in sweep.runs for seed in sweep.seeds]
    for index, (name, seed) in enumerate(jobs, 1):
        folder = out / f"{name}-seed{seed}"
        if (folder / "summary.json").is_file():
            print(f"[sweep {index}/{len(jobs)}] {folder.name}: finished earlier, skipped")
            continue
        print(f"[sweep {index}/{len(jobs)}] {folder.name}: running")
        keys = {**sweep.runs[name], "seed": seed, "results-dir": str(folder)}
        scenario = write_variant(sweep.scenario, folder / "scenario", keys)
        try:
            code = run(scenario, [])
        except Exception as err:  # a failed run is a row of the table, not the end of the sweep
            print(f"[sweep] {folder.name} failed: {err}")
            code = 1
        print(f"[sweep {index}/{len(jobs)}] {folder.name}: exit code {code}")
    rows = comparison_rows(sweep, out)
    write_comparison(rows, out, sweep)
    return rows


def when_reached(records: list[dict[str, Any]], sweep: Sweep, key: str = "round") -> float | None:
    """``key`` (the round, or the simulated seconds) of the first round whose target metric
    reaches the sweep's target; None when no round does (or there is no target)."""
    if sweep.target is None:
        return None
    metric, lower, _ = TARGETS[sweep.target_key]

    def reached(value: float | None) -> bool:
        return value is not None and (value <= sweep.target if lower else value >= sweep.target)

    return next((r.get(key) for r in records if reached(r.get(metric))), None)


def comparison_rows(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """One row per (run, seed): its status and, when it finished, its figures and curves."""
    rows = []
    for name in sweep.runs:
        for seed in sweep.seeds:
            folder = out / f"{name}-seed{seed}"
            row: dict[str, Any] = {
                "run": name,
                "seed": seed,
                "strategy": sweep.runs[name].get("strategy", ""),
            }
            summary_path = folder / "summary.json"
            if not summary_path.is_file():  # started and stopped (its log says why), or not yet
                rows.append({**row, "status": "failed" if folder.is_dir() else "not run"})
                continue
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            records = read_metrics(folder)
            rows.append(
                {
                    **row,
                    "status": "completed",
                    "final_accuracy": round(summary["final_accuracy"], 4),
                    "best_accuracy": round(summary["best_accuracy"], 4),
                    "final_loss": round(records[-1]["loss"], 4),
                    "final_rouge_l": _rounded(summary.get("final_rouge_l")),
                    "final_perplexity": _rounded(summary.get("final_perplexity")),
                    "rounds_to_target": when_reached(records, sweep),
                    "simulated_to_target": when_reached(records, sweep, "simulated_total"),
                    "mb_down": round(summary["bytes_down"] / 1e6, 2),
                    "mb_up": round(summary["bytes_up"] / 1e6, 2),
                    "simulated_seconds": summary.get("simulated_seconds"),
                    "stragglers": summary.get("stragglers"),
                    "seconds": round(summary["seconds"], 1),
                    "accuracy_by_round": [r["accuracy"] for r in records],
                    "loss_by_round": [r["loss"] for r in records],
                    "simulated_by_round": [r.get("simulated_total", 0.0) for r in records],
                    "rouge_l_by_round": [r.get("rouge_l") for r in records],
                }
            )
    return rows


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# The quality figures of the generation task (in place of accuracy in the comparison table).
GENERATION_QUALITY = ("final_rouge_l", "final_perplexity")
# The figures of a finished run: per seed in comparison.csv, summarised over seeds in summary.csv.
SUMMARISED = (
    "final_accuracy",
    "best_accuracy",
    "final_loss",
    *GENERATION_QUALITY,
    "rounds_to_target",
    "simulated_to_target",
    "mb_down",
    "mb_up",
    "simulated_seconds",
    "stragglers",
    "seconds",
)
COLUMNS = ("run", "strategy", "seed", "status", *SUMMARISED)
PAIRED = ("final_accuracy", "best_accuracy", "final_loss", *GENERATION_QUALITY)  # by seed


def is_generation(rows: list[dict[str, Any]]) -> bool:
    """Whether the sweep's runs are of the generation task (they report ROUGE-L)."""
    return any(r.get("final_rouge_l") is not None for r in rows)


def seed_values(rows: list[dict[str, Any]], run: str, metric: str) -> dict[int, float]:
    """seed -> value of ``metric`` for the finished seeds of ``run`` that have one."""
    return {
        r["seed"]: r[metric]
        for r in rows
        if r["run"] == run and r["status"] == "completed" and r.get(metric) is not None
    }


def summary_rows(rows: list[dict[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """Per run: each figure's :class:`~tooling.stats.Interval` over the seeds, and with a
    baseline, the paired difference to it of :data:`PAIRED` (same seeds)."""
    summaries = []
    for name in sweep.runs:
        finished = seed_values(rows, name, "final_accuracy")
        summary: dict[str, Any] = {
            "run": name,
            "strategy": sweep.runs[name].get("strategy", ""),
            "seeds": len(finished),
            "failed": sum(r["run"] == name and r["status"] == "failed" for r in rows),
        }
        for metric in SUMMARISED:
            summary[metric] = mean_interval(list(seed_values(rows, name, metric).values()))
        summary["reached_target"] = len(seed_values(rows, name, "rounds_to_target"))
        if sweep.baseline is not None:
            for metric in PAIRED:
                summary[f"{metric}_vs_baseline"] = paired_difference(
                    seed_values(rows, name, metric), seed_values(rows, sweep.baseline, metric)
                )
        summaries.append(summary)
    return summaries


def _interval_columns(summaries: list[dict[str, Any]]) -> list[str]:
    return [k for k, v in summaries[0].items() if isinstance(v, Interval)] if summaries else []


def write_comparison(rows: list[dict[str, Any]], out: Path, sweep: Sweep) -> None:
    """``comparison.csv`` (a row per run and seed), ``summary.csv`` (per run: mean, sd and
    95% interval of every figure; paired differences to the baseline), ``comparison.md``,
    ``accuracy.png`` (``rouge_l.png`` for generation) and ``loss.png`` (mean per round with its
    interval shaded), and ``accuracy_vs_time.png`` (``rouge_l_vs_time.png``) when the device
    clock ran."""
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summaries = summary_rows(rows, sweep)
    intervals = _interval_columns(summaries)
    fields = ["run", "strategy", "seeds", "failed", "reached_target"]
    fields += [f"{c}_{part}" for c in intervals for part in ("mean", "sd", "low", "high")]
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for summary in summaries:
            flat = {k: v for k, v in summary.items() if not isinstance(v, Interval)}
            for column in intervals:
                value = summary[column]
                for part in ("mean", "sd", "low", "high"):
                    flat[f"{column}_{part}"] = _csv_number(getattr(value, part))
            writer.writerow(flat)
    (out / "comparison.md").write_text(comparison_markdown(rows, summaries, sweep), "utf-8")
    # exact match of free-form text is ~0: a generation sweep plots ROUGE-L in its place
    if is_generation(rows):
        quality, label = "rouge_l", "ROUGE-L F1 of greedy generations"
    else:
        quality, label = "accuracy", "central test accuracy"
    plot_curves(rows, sweep, quality, label, out / f"{quality}.png")
    plot_curves(rows, sweep, "loss", "central test loss", out / "loss.png")
    if any(r.get("simulated_seconds") for r in rows):  # the device clock ran: against its time
        plot_curves(rows, sweep, quality, label, out / f"{quality}_vs_time.png", "simulated")


def _csv_number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"


def comparison_markdown(
    rows: list[dict[str, Any]], summaries: list[dict[str, Any]], sweep: Sweep
) -> str:
    """The per-run table over seeds (mean ± 95% interval half-width) and the per-seed table."""
    lines = []
    if len(sweep.seeds) > 1:
        quality = list(GENERATION_QUALITY) if is_generation(rows) else []
        compared = quality or ["final_accuracy"]
        columns = [*(quality or ["final_accuracy", "best_accuracy"]), "final_loss"]
        if sweep.baseline is not None:
            columns += [f"{m}_vs_baseline" for m in (*compared, "final_loss")]
        columns += ["rounds_to_target", "mb_down", "mb_up", "seconds"]
        if any(r.get("simulated_seconds") for r in rows):  # the device clock ran
            columns[-1:-1] = ["simulated_to_target", "simulated_seconds", "stragglers"]
        lines += [
            f"Mean ± 95% interval (Student t) over seeds {', '.join(map(str, sweep.seeds))}"
            + (
                f"; `_vs_baseline`: paired difference to `{sweep.baseline}`, same seeds."
                if sweep.baseline is not None
                else "."
            ),
            "",
            "| run | strategy | seeds | " + " | ".join(columns) + " |",
            "|---|---|---|" + "---|" * len(columns),
        ]
        for summary in summaries:
            cells = [summary["run"], summary["strategy"], str(summary["seeds"])]
            for column in columns:
                digits = 3 if column in SUMMARISED[:5] or "_vs_" in column else 1
                text = summary[column].format(digits)
                if column.endswith("_to_target") and summary["seeds"]:
                    text = f"{text} ({summary['reached_target']}/{summary['seeds']} reached)"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Per seed:", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["" if row.get(c) is None else str(row.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if sweep.target is not None:
        metric, lower, _ = TARGETS[sweep.target_key]
        lines.append(
            f"\nrounds_to_target, simulated_to_target: the first round with {metric} "
            f"{'<=' if lower else '>='} {sweep.target}, and the simulated device seconds until "
            "its end"
        )
    return "\n".join(lines) + "\n"


def plot_curves(
    rows: list[dict[str, Any]],
    sweep: Sweep,
    metric: str,
    label: str,
    path: Path,
    x: str = "round",
) -> None:
    """A line per run: the mean of ``metric`` per round over its finished seeds, with the 95%
    interval shaded when there are several; against the round, or (``x="simulated"``) the mean
    simulated device seconds at the end of each round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sweep.runs:
        done = [r for r in rows if r["run"] == name and r["status"] == "completed"]
        if not done:
            continue
        length = min(len(r[f"{metric}_by_round"]) for r in done)
        per_round = [
            mean_interval([r[f"{metric}_by_round"][t] for r in done]) for t in range(length)
        ]
        xs = list(range(length))
        if x == "simulated":
            xs = [float(np.mean([r["simulated_by_round"][t] for r in done])) for t in xs]
        (line,) = ax.plot(xs, [i.mean for i in per_round], marker="o", markersize=3, label=name)
        if len(done) > 1:
            low, high = [i.low for i in per_round], [i.high for i in per_round]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round" if x == "round" else "simulated device seconds")
    ax.set_ylabel(label + (f" (mean of {len(sweep.seeds)} seeds)" if len(sweep.seeds) > 1 else ""))
    ax.set_title(sweep.scenario.name)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(folders: list[str | Path]) -> str:
    """A Markdown table comparing finished runs (one row per results folder; ``hetfed table``)."""
    rows = [
        "| run | strategy | final acc. | best acc. | MB down | MB up | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for folder in folders:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            rows.append(
                f"| {Path(folder).name} | (no summary.json: failed or unfinished) | | | | | |"
            )
            continue
        s = json.loads(path.read_text(encoding="utf-8"))
        rows.append(
            f"| {Path(folder).name} | {s['strategy'].split(':')[0]} | {s['final_accuracy']:.4f} "
            f"| {s['best_accuracy']:.4f} | {s['bytes_down'] / 1e6:.1f} | {s['bytes_up'] / 1e6:.1f}"
            f" | {s['seconds']:.0f} |"
        )
    return "\n".join(rows)
