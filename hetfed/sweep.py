"""Sweeps: one scenario run over several strategies, options and seeds, compared in one table.

A sweep file (YAML)::

    scenario: scenarios/banking77-ranks     # relative to the sweep file
    seeds: [42]                             # optional; each run once per seed
    target-accuracy: 0.5                    # optional; for "rounds to target"
    runs:                                   # name -> run-config keys set for that run
      hetlora: {strategy: hetlora}
      helora-pad-zero: {strategy: helora-pad, helora-pad.filler: zero}

Each run is a real Flower run of a copy of the scenario whose config has the run's keys (so a
run may set options of its own strategy that the scenario does not name). Results go to
``<out>/<run>-seed<seed>/``; a run whose ``summary.json`` exists is not redone. At the end the
sweep writes ``comparison.csv``, ``comparison.md`` and ``accuracy.png`` (a line per run).
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import yaml
from flwr.common.config import flatten_dict, unflatten_dict

from hetfed.errors import ConfigError
from hetfed.results import read_metrics

SWEEP_KEYS = ("scenario", "seeds", "target-accuracy", "runs")


@dataclass(frozen=True)
class Sweep:
    scenario: Path
    runs: dict[str, dict[str, Any]]
    seeds: tuple[int, ...] = (42,)
    target_accuracy: float | None = None


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
    target = doc.get("target-accuracy")
    if target is not None and not (isinstance(target, int | float) and 0 < target <= 1):
        raise ConfigError("target-accuracy", target, "a number in (0, 1]", source)
    return Sweep(scenario, {str(k): dict(v) for k, v in runs.items()}, tuple(seeds), target)


def write_variant(scenario: Path, folder: Path, keys: dict[str, Any]) -> Path:
    """A copy of ``scenario`` in ``folder`` whose run config has ``keys`` set."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(scenario, folder, ignore=shutil.ignore_patterns("results", ".*"))
    doc = tomllib.loads((scenario / "pyproject.toml").read_text(encoding="utf-8"))
    app = doc["tool"]["flwr"]["app"]
    config = flatten_dict(app.get("config", {}))
    config.update(keys)
    app["config"] = unflatten_dict(config)
    # Flower app names: a letter first, letters, digits and hyphens, at most 32 characters.
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    doc["project"]["name"] = f"hetfed-sweep-{digest}"
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    return folder


def run_sweep(sweep: Sweep, out: str | Path) -> list[dict[str, Any]]:
    """Run every (run, seed) not finished yet, then write the comparison files."""
    from hetfed.cli import run as run_scenario  # the same path as `hetfed run`

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
            code = run_scenario(scenario, [])
        except Exception as err:  # a failed run is a row of the table, not the end of the sweep
            print(f"[sweep] {folder.name} failed: {err}")
            code = 1
        print(f"[sweep {index}/{len(jobs)}] {folder.name}: exit code {code}")
    rows = comparison_rows(sweep, out)
    write_comparison(rows, out, sweep)
    return rows


def rounds_to(records: list[dict[str, Any]], target: float | None) -> int | None:
    if target is None:
        return None
    return next((r["round"] for r in records if r["accuracy"] >= target), None)


def comparison_rows(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    import json

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
            if not summary_path.is_file():
                rows.append({**row, "status": "failed"})
                continue
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            records = read_metrics(folder)
            rows.append(
                {
                    **row,
                    "status": "completed",
                    "final_accuracy": round(summary["final_accuracy"], 4),
                    "best_accuracy": round(summary["best_accuracy"], 4),
                    "rounds_to_target": rounds_to(records, sweep.target_accuracy),
                    "mb_down": round(summary["bytes_down"] / 1e6, 2),
                    "mb_up": round(summary["bytes_up"] / 1e6, 2),
                    "seconds": round(summary["seconds"], 1),
                    "accuracy_by_round": [r["accuracy"] for r in records],
                }
            )
    return rows


COLUMNS = (
    "run",
    "strategy",
    "seed",
    "status",
    "final_accuracy",
    "best_accuracy",
    "rounds_to_target",
    "mb_down",
    "mb_up",
    "seconds",
)


def write_comparison(rows: list[dict[str, Any]], out: Path, sweep: Sweep) -> None:
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["" if row.get(c) is None else str(row.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if sweep.target_accuracy is not None:
        lines.append(f"\nrounds_to_target: first round with accuracy >= {sweep.target_accuracy}")
    (out / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row["status"] == "completed":
            label = row["run"] if len(sweep.seeds) == 1 else f"{row['run']} (seed {row['seed']})"
            accuracy = row["accuracy_by_round"]
            ax.plot(range(len(accuracy)), accuracy, marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("central test accuracy")
    ax.set_title(sweep.scenario.name)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
