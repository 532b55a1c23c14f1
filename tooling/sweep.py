"""Sweeps: one scenario run over several strategies, options and seeds, compared in one table.

A sweep file (YAML)::

    scenario: scenarios/banking77-ranks     # relative to the sweep file
    seeds: [1, 2, 3]                        # optional (default [42]); each run once per seed
    target-accuracy: 0.5                    # optional, for "rounds to target"; or
                                            # target-rouge-l, target-perplexity (lower is better)
    baseline: fedit                         # optional; paired differences to this run
    pairs: [[hetlora, helora-pad-zero]]     # optional; further paired differences, run - ref
    select-lr: {rounds: 5, seed: 0}         # optional: a row whose train.lr is a list
                                            # (validation: clients: on the clients' own)
    common: {data.validation-examples: 500} # optional: keys every run sets (a row overrides)
    runs:                                   # name -> run-config keys set for that run
      hetlora: {strategy: hetlora}
      helora-pad-zero: {strategy: helora-pad, helora-pad.filler: zero}
      fedit: {strategy: fedit, train.lr: [0.001, 0.003, 0.01]}   # chosen on validation

Each run is a real Flower run of a copy of the scenario whose config has the run's keys (so a
run may set options of its own strategy that the scenario does not name) and the seed. Results
go to ``<out>/<run>-seed<seed>/``; a run whose ``summary.json`` exists is not redone. At the end
the sweep writes ``comparison.csv`` (a row per run and seed), ``summary.csv`` and
``comparison.md`` (per run, the mean and 95% interval over the seeds, :mod:`tooling.stats`, and
the paired differences to the baseline and between the ``pairs``, each with its paired t-test
p-value raw and Holm-adjusted over all of them; ``pairs.csv``) and ``accuracy.png``/``loss.png``
(the mean per round, the interval shaded). A generation sweep's table and plot show ROUGE-L and
perplexity in place of exact match (``rouge_l.png``); a run not started yet is ``not run``, one
that stopped without a summary ``failed``.

``hetfed sweep FILE --runs a,b --seeds 1,2,3`` runs rows ``a`` and ``b`` at seeds 1-3 only
(seed by seed, as always) and still writes the tables of every row and seed: the rows and
seeds a study needs first (every row at three seeds before any at five) are run first.

Step sizes: a row whose ``train.lr`` is a list is first run once per value, ``select-lr.rounds``
rounds at seed ``select-lr.seed`` (``<out>/<run>-lr<value>/``), and the value whose final
validation score is best (the sweep's target metric, accuracy by default) is the row's step
size for its seeds. The scenario (or the row) must have a validation split
(``data.validation-examples``): a step size is never chosen on the test split. With
``select-lr.validation: clients`` the score is instead the clients' mean accuracy on their
own validation splits (``data.local-validation-fraction``, federated evaluation): the choice
for a personalised method, whose model lives on the clients. The choice, the scores and the
runs it took are in ``<out>/<run>-lr-selection.json`` and in the tables.
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
from hetfed.metrics import ACCURACY, BY_TARGET_KEY, CLIENT_FIGURES, Metric, quality
from hetfed.results import TEST_EXAMPLES, read_metrics
from server_apps.run_plan import plan_run
from tooling.scenarios import run, variant_config, write_variant
from tooling.stats import (
    Interval,
    holm,
    mean_interval,
    paired_bootstrap,
    paired_difference,
    paired_t_p_value,
)

SWEEP_KEYS = (
    "scenario",
    "seeds",
    *BY_TARGET_KEY,
    "baseline",
    "pairs",
    "select-lr",
    "common",
    "runs",
)
LR = "train.lr"
# select-lr.validation: a step size chosen on the central validation split (the sweep's target
# metric) or on the clients' own validation splits (their mean accuracy, federated evaluation)
CENTRAL, CLIENTS = "central", "clients"


@dataclass(frozen=True)
class Sweep:
    scenario: Path
    runs: dict[str, dict[str, Any]]
    seeds: tuple[int, ...] = (42,)
    target: float | None = None  # the value of the target metric that counts as reached
    target_key: str = "target-accuracy"  # which metric it is on (hetfed.metrics.BY_TARGET_KEY)

    @property
    def target_metric(self) -> Metric:
        return BY_TARGET_KEY[self.target_key]

    baseline: str | None = None  # a run name: every run's paired difference to it
    # (run, reference): further paired differences the study asks for (an ablation, a method
    # against the one it claims to improve), tabled and corrected with the baseline's
    pairs: tuple[tuple[str, str], ...] = ()
    select_rounds: int = 0  # select-lr.rounds: the short budget of a step-size candidate
    select_seed: int = 0  # select-lr.seed: a seed apart from the compared ones
    select_validation: str = CENTRAL  # select-lr.validation: the split a step size is chosen on

    def lr_grid(self, run: str) -> list[float] | None:
        """The step sizes ``run`` chooses from (None: its train.lr is one value)."""
        value = self.runs[run].get(LR)
        return [float(v) for v in value] if isinstance(value, list) else None


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
    common = doc.get("common", {})
    if not isinstance(common, dict):
        raise ConfigError("common", common, "a mapping of run-config keys", source)
    seeds = doc.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError("seeds", seeds, "a list of integers", source)
    targets = [key for key in BY_TARGET_KEY if key in doc]
    if len(targets) > 1:
        raise ConfigError(
            targets[1], doc[targets[1]], f"only one target key ({targets[0]} is set)", source
        )
    target_key = targets[0] if targets else "target-accuracy"
    target = doc.get(target_key)
    metric = BY_TARGET_KEY[target_key]
    if target is not None and not metric.valid_target(target):
        raise ConfigError(target_key, target, metric.target_allowed(), source)
    baseline = doc.get("baseline")
    if baseline is not None and baseline not in runs:
        raise ConfigError("baseline", baseline, f"one of the runs: {', '.join(runs)}", source)
    pairs = _pairs(doc.get("pairs", []), runs, source)
    runs = {str(k): {**common, **v} for k, v in runs.items()}  # a row's own keys win
    select = doc.get("select-lr", {})
    grids = [name for name, keys in runs.items() if isinstance(keys.get(LR), list)]
    rounds, select_seed, select_validation = _select_lr(select, grids, source)
    for name in grids:
        grid = runs[name][LR]
        if not grid or not all(isinstance(v, int | float) and 0 < v < 1 for v in grid):
            raise ConfigError(f"runs.{name}.{LR}", grid, "a list of numbers in (0, 1)", source)
    return Sweep(
        scenario,
        runs,
        tuple(seeds),
        target,
        target_key,
        baseline,
        pairs,
        rounds,
        select_seed,
        select_validation,
    )


def _pairs(pairs: Any, runs: dict[str, Any], source: str) -> tuple[tuple[str, str], ...]:
    """``pairs``: a list of [run, reference], two different runs of the sweep each."""
    allowed = f"a list of [run, reference] pairs of different runs among {', '.join(runs)}"
    if not isinstance(pairs, list):
        raise ConfigError("pairs", pairs, allowed, source)
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1]):
            raise ConfigError("pairs", pair, allowed, source)
        if not all(isinstance(name, str) and name in runs for name in pair):
            raise ConfigError("pairs", pair, allowed, source)
    return tuple((str(run), str(reference)) for run, reference in pairs)


def _select_lr(select: Any, grids: list[str], source: str) -> tuple[int, int, str]:
    """select-lr's rounds, seed and validation split; it is required by (and only by) a row
    with a grid."""
    if grids and not select:
        raise ConfigError(
            "select-lr", None, f"{{rounds: R, seed: S}}: runs {grids} give train.lr a list", source
        )
    if not select:
        return 0, 0, CENTRAL
    if not grids:
        raise ConfigError("select-lr", select, "absent: no run gives train.lr a list", source)
    allowed = "{rounds: an integer >= 1, seed: >= 0, validation: central | clients}"
    if not isinstance(select, dict) or set(select) - {"rounds", "seed", "validation"}:
        raise ConfigError("select-lr", select, allowed, source)
    rounds, seed, validation = (
        select.get("rounds"),
        select.get("seed", 0),
        select.get("validation", CENTRAL),
    )
    if not isinstance(rounds, int) or rounds < 1 or not isinstance(seed, int) or seed < 0:
        raise ConfigError("select-lr", select, allowed, source)
    if validation not in (CENTRAL, CLIENTS):
        raise ConfigError("select-lr.validation", validation, "central | clients", source)
    return rounds, seed, validation


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    only: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Run every (run, seed) not finished yet (as ``hetfed run`` does), then write the
    comparison files. ``only`` names the rows to run now and ``seeds`` the seeds (default:
    all); the tables still cover every row and seed, so a study reaches the rows and seeds it
    needs first (every row at three seeds before any at five) in the order it needs them."""
    out = Path(out).resolve()
    for name in only or []:
        if name not in sweep.runs:
            raise ConfigError("--runs", name, f"rows of the sweep: {', '.join(sweep.runs)}")
    for seed in seeds or []:
        if seed not in sweep.seeds:
            allowed = ", ".join(map(str, sweep.seeds))
            raise ConfigError("--seeds", seed, f"seeds of the sweep: {allowed}")
    names = [name for name in sweep.runs if only is None or name in only]
    check_rows(sweep, names)
    out.mkdir(parents=True, exist_ok=True)
    # seed by seed, so a sweep stopped part-way has every row at the seeds it finished; a row's
    # step size is chosen before its first seed runs
    now = [seed for seed in sweep.seeds if seeds is None or seed in seeds]
    jobs = [(name, seed) for seed in now for name in names]
    chosen: dict[str, float] = {}
    for index, (name, seed) in enumerate(jobs, 1):
        if sweep.lr_grid(name) and name not in chosen:
            chosen[name] = _choose_lr(sweep, name, out)
        keys = {**sweep.runs[name], **({LR: chosen[name]} if name in chosen else {})}
        _run_once(out / f"{name}-seed{seed}", sweep, {**keys, "seed": seed}, f"{index}/{len(jobs)}")
    rows = comparison_rows(sweep, out)
    write_comparison(rows, out, sweep)
    return rows


def check_rows(sweep: Sweep, names: list[str]) -> None:
    """Validate every row's run config (:func:`server_apps.run_plan.plan_run`, each value of
    its step-size grid) before the sweep's first run, so that a wrong key in the last row
    stops the sweep before any training; the error names the row."""
    for name in names:
        for lr in sweep.lr_grid(name) or [None]:
            keys = {**sweep.runs[name], **({LR: lr} if lr is not None else {})}
            config = variant_config(sweep.scenario, {**keys, "seed": sweep.seeds[0]})
            try:
                plan_run(config, project_dir=sweep.scenario)
            except ConfigError as err:
                where = f"sweep row {name!r} ({err.source})"
                raise ConfigError(err.key, err.value, err.allowed, where) from err


def _run_once(folder: Path, sweep: Sweep, keys: dict[str, Any], index: str) -> None:
    """One run of the scenario with ``keys`` into ``folder``, unless it finished earlier."""
    if (folder / "summary.json").is_file():
        print(f"[sweep {index}] {folder.name}: finished earlier, skipped")
        return
    print(f"[sweep {index}] {folder.name}: running")
    scenario = write_variant(
        sweep.scenario, folder / "scenario", {**keys, "results-dir": str(folder)}
    )
    try:
        code = run(scenario, [])
    except Exception as err:  # a failed run is a row of the table, not the end of the sweep
        print(f"[sweep] {folder.name} failed: {err}")
        code = 1
    print(f"[sweep {index}] {folder.name}: exit code {code}")


def _choose_lr(sweep: Sweep, name: str, out: Path) -> float:
    """Run ``name`` once per step size of its grid on the short budget, then choose
    (:func:`select_lr`) and record the choice."""
    grid = sweep.lr_grid(name)
    folders = {}
    for i, lr in enumerate(grid, 1):
        folder = out / f"{name}-lr{lr:g}"
        keys = {
            **sweep.runs[name],
            LR: lr,
            "seed": sweep.select_seed,
            "num-server-rounds": sweep.select_rounds,
        }
        _run_once(folder, sweep, keys, f"select {name} {i}/{len(grid)}")
        folders[lr] = folder
    choice = select_lr(folders, sweep)
    (out / f"{name}-lr-selection.json").write_text(json.dumps(choice, indent=2) + "\n")
    print(f"[sweep] {name}: train.lr {choice['selected']:g} chosen on validation")
    return choice["selected"]


def select_lr(folders: dict[float, Path], sweep: Sweep) -> dict[str, Any]:
    """The step size whose run ends best on the validation split, read from ``metrics.jsonl``
    only (rounds evaluated on test are refused): by the sweep's target metric (its direction)
    on the central split, or (``select-lr.validation: clients``) by the clients' mean accuracy
    on their own validation splits."""
    metric, key, split_key = sweep.target_metric, sweep.target_metric.key, "split"
    needs = ("data.validation-examples", "an integer > 0")
    if sweep.select_validation == CLIENTS:  # the clients' mean accuracy: higher is better
        metric, key, split_key = ACCURACY, CLIENT_FIGURES[0], "client_split"
        needs = ("data.local-validation-fraction", "a number in (0, 1) with fraction-evaluate > 0")
    scores = {}
    for lr, folder in folders.items():
        records = read_metrics(folder) if (folder / "metrics.jsonl").is_file() else []
        if not records:
            raise ConfigError("select-lr", str(folder), "a finished candidate run")
        if records[-1].get(split_key) != "validation":
            raise ConfigError(
                needs[0],
                0,
                f"{needs[1]} in the scenario or the run: a step size is chosen on a validation "
                "split, never on the test split",
                str(folder),
            )
        scores[lr] = records[-1][key]
    best = metric.best_of(scores)
    return {"selected": best, "metric": key, "scores": scores, "runs": len(scores)}


def when_reached(records: list[dict[str, Any]], sweep: Sweep, key: str = "round") -> float | None:
    """``key`` (the round, or the simulated seconds) of the first round whose target metric
    reaches the sweep's target; None when no round does (or there is no target)."""
    if sweep.target is None:
        return None
    metric = sweep.target_metric
    return next(
        (r.get(key) for r in records if metric.reached(r.get(metric.key), sweep.target)), None
    )


def comparison_rows(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """One row per (run, seed): its status and, when it finished, its figures and curves."""
    rows = []
    for name in sweep.runs:
        selection = out / f"{name}-lr-selection.json"
        chosen = json.loads(selection.read_text()) if selection.is_file() else None
        for seed in sweep.seeds:
            folder = out / f"{name}-seed{seed}"
            row: dict[str, Any] = {
                "run": name,
                "seed": seed,
                "strategy": sweep.runs[name].get("strategy", ""),
            }
            if chosen is not None:  # the step size chosen on validation, and its cost
                row |= {"lr": chosen["selected"], "selection_runs": chosen["runs"]}
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
                    "last_rounds_accuracy": _rounded(summary.get("last_rounds_accuracy")),
                    **{key: _rounded(summary.get(key)) for key in CLIENT_COLUMNS},
                    "test_rounds": summary.get("test_rounds", 1),
                    # the final model on test (runs from before summary.json had it: the
                    # last round's evaluation, which was on test then)
                    "final_loss": round(summary.get("final_loss", records[-1]["loss"]), 4),
                    "evaluated_on": summary.get("evaluated_on", "test"),
                    "final_rouge_l": _rounded(summary.get("final_rouge_l")),
                    "final_perplexity": _rounded(summary.get("final_perplexity")),
                    "rounds_to_target": when_reached(records, sweep),
                    "simulated_to_target": when_reached(records, sweep, "simulated_total"),
                    "mb_down": round(summary["bytes_down"] / 1e6, 2),
                    "mb_up": round(summary["bytes_up"] / 1e6, 2),
                    "simulated_seconds": summary.get("simulated_seconds"),
                    "stragglers": summary.get("stragglers"),
                    "pruned_replies": summary.get("pruned_replies"),
                    "seconds": round(summary["seconds"], 1),
                    "accuracy_by_round": [r["accuracy"] for r in records],
                    "loss_by_round": [r["loss"] for r in records],
                    "simulated_by_round": [r.get("simulated_total", 0.0) for r in records],
                    "rouge_l_by_round": [r.get("rouge_l") for r in records],
                    "test_examples": _test_examples(folder),
                }
            )
    return rows


def _test_examples(folder: Path) -> list[dict[str, Any]]:
    """The final model's per-example test scores (runs from before they were saved: none)."""
    path = folder / TEST_EXAMPLES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# The quality figures of the generation task (in place of accuracy in the comparison table).
GENERATION_QUALITY = tuple(f"final_{m.key}" for m in quality(generation=True))
# A federated evaluation's figures of the final model (fraction-evaluate).
CLIENT_COLUMNS = tuple(f"final_{key}" for key in CLIENT_FIGURES)
# The quality figures of a run (tables print them to three decimals).
QUALITY = (
    "final_accuracy",
    "last_rounds_accuracy",
    "best_accuracy",
    "final_loss",
    *GENERATION_QUALITY,
    *CLIENT_COLUMNS,
)
# The figures of a finished run: per seed in comparison.csv, summarised over seeds in summary.csv.
SUMMARISED = (
    *QUALITY,
    "rounds_to_target",
    "simulated_to_target",
    "mb_down",
    "mb_up",
    "simulated_seconds",
    "stragglers",
    "pruned_replies",
    "seconds",
)
COLUMNS = ("run", "strategy", "seed", "status", *SUMMARISED)
PAIRED = (
    "final_accuracy",
    "last_rounds_accuracy",
    "best_accuracy",
    "final_loss",
    *GENERATION_QUALITY,
    *CLIENT_COLUMNS[:2],  # the clients' mean and worst 10%
)  # by seed


P_VALUES = ("_p", "_p_holm")  # suffixes of a paired difference's raw and Holm-adjusted p


def is_generation(rows: list[dict[str, Any]]) -> bool:
    """Whether the sweep's runs are of the generation task (they report ROUGE-L)."""
    return _with(rows, "final_rouge_l")


def seed_values(rows: list[dict[str, Any]], run: str, metric: str) -> dict[int, float]:
    """seed -> value of ``metric`` for the finished seeds of ``run`` that have one."""
    return {
        r["seed"]: r[metric]
        for r in rows
        if r["run"] == run and r["status"] == "completed" and r.get(metric) is not None
    }


def summary_rows(rows: list[dict[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """Per run: each figure's :class:`~tooling.stats.Interval` over the seeds, and with a
    baseline, the paired difference to it of :data:`PAIRED` (same seeds) and the paired
    bootstrap of the final quality (:func:`paired_figures`, keys ``<figure>_vs_baseline``)."""
    summaries = []
    for name in sweep.runs:
        finished = seed_values(rows, name, "final_accuracy")
        summary: dict[str, Any] = {
            "run": name,
            "strategy": sweep.runs[name].get("strategy", ""),
            "seeds": len(finished),
            "failed": sum(r["run"] == name and r["status"] == "failed" for r in rows),
        }
        chosen = next((r for r in rows if r["run"] == name and "lr" in r), None)
        if chosen is not None:
            summary |= {"lr": chosen["lr"], "selection_runs": chosen["selection_runs"]}
        for metric in SUMMARISED:
            summary[metric] = mean_interval(list(seed_values(rows, name, metric).values()))
        summary["reached_target"] = len(seed_values(rows, name, "rounds_to_target"))
        if sweep.baseline is not None:
            summary |= paired_figures(rows, name, sweep.baseline, "_vs_baseline")
        summaries.append(summary)
    return summaries


def pair_rows(rows: list[dict[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """Per pair of the sweep's ``pairs``: run - reference of the same figures as a run's
    difference to the baseline (keys ``<figure>_difference``), over the seeds both finished."""
    pairs = []
    for name, reference in sweep.pairs:
        figures = paired_figures(rows, name, reference, "_difference")
        # the seeds both finished: those the final accuracy's difference is taken over
        seeds = figures["final_accuracy_difference"].n
        pairs.append({"run": name, "reference": reference, "seeds": seeds, **figures})
    return pairs


def paired_figures(
    rows: list[dict[str, Any]], run: str, reference: str, suffix: str
) -> dict[str, Interval]:
    """``run - reference`` paired by seed for each figure of :data:`PAIRED` (key: the figure
    and ``suffix``), and for the final quality (accuracy, or ROUGE-L for generation) also the
    paired bootstrap over the test examples (key ending ``_bootstrap``)."""
    compared = quality(is_generation(rows))[0]
    figures = {
        f"{metric}{suffix}": paired_difference(
            seed_values(rows, run, metric), seed_values(rows, reference, metric)
        )
        for metric in PAIRED
    }
    figures[f"final_{compared.key}{suffix}_bootstrap"] = paired_bootstrap(
        test_example_pairs(rows, run, reference, compared.per_example)
    )
    return figures


def add_p_values(
    summaries: list[dict[str, Any]], pairs: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> None:
    """Give every difference of the final quality in the tables (each run's to the baseline,
    each pair's) its paired t-test p-value, raw (``_p``) and Holm-adjusted over that whole
    family (``_p_holm``): the tables' verdicts read at a family-wise 5%."""
    final = f"final_{quality(is_generation(rows))[0].key}"
    family = [(s, f"{final}_vs_baseline") for s in summaries if f"{final}_vs_baseline" in s]
    family += [(pair, f"{final}_difference") for pair in pairs]
    p_values = [paired_t_p_value(entry[key]) for entry, key in family]
    for (entry, key), p, adjusted in zip(family, p_values, holm(p_values), strict=True):
        entry[f"{key}_p"], entry[f"{key}_p_holm"] = p, adjusted


def test_example_pairs(
    rows: list[dict[str, Any]], run: str, baseline: str, field: str
) -> list[tuple[list[float], list[float]]]:
    """Per seed both finished with per-example test scores: ``field`` of each test example
    for ``run`` and for ``baseline`` (the same examples: the seed fixes the test split)."""
    scores = {
        (r["run"], r["seed"]): [float(e[field]) for e in r.get("test_examples", [])]
        for r in rows
        if r["status"] == "completed"
    }
    return [
        (scores[run, seed], scores[baseline, seed])
        for seed in sorted({seed for _, seed in scores})
        if scores.get((run, seed)) and scores.get((baseline, seed))
    ]


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
    summaries, pairs = summary_rows(rows, sweep), pair_rows(rows, sweep)
    add_p_values(summaries, pairs, rows)
    fields = ["run", "strategy", "seeds", "failed", "reached_target"]
    fields += [f for f in ("lr", "selection_runs") if any(f in s for s in summaries)]
    _write_intervals_csv(out / "summary.csv", summaries, fields)
    if pairs:
        _write_intervals_csv(out / "pairs.csv", pairs, ["run", "reference", "seeds"])
    markdown = comparison_markdown(rows, summaries, sweep, pairs)
    (out / "comparison.md").write_text(markdown, "utf-8")
    # exact match of free-form text is ~0: a generation sweep plots ROUGE-L in its place
    compared = quality(is_generation(rows))[0]
    key, label = compared.key, f"central {compared.label}"
    plot_curves(rows, sweep, key, label, out / f"{key}.png")
    plot_curves(rows, sweep, "loss", "central test loss", out / "loss.png")
    if any(r.get("simulated_seconds") for r in rows):  # the device clock ran: against its time
        plot_curves(rows, sweep, key, label, out / f"{key}_vs_time.png", "simulated")


def _write_intervals_csv(path: Path, entries: list[dict[str, Any]], fields: list[str]) -> None:
    """A CSV row per entry: ``fields``, then every interval's mean, sd, low and high, then
    the p-values."""
    intervals = _interval_columns(entries)
    fields = fields + [f"{c}_{part}" for c in intervals for part in ("mean", "sd", "low", "high")]
    fields += list(dict.fromkeys(k for e in entries for k in e if k.endswith(P_VALUES)))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        for entry in entries:
            flat = {k: v for k, v in entry.items() if not isinstance(v, Interval)}
            flat |= {k: _csv_number(v) for k, v in flat.items() if k.endswith(P_VALUES)}
            for column in intervals:
                for part in ("mean", "sd", "low", "high"):
                    flat[f"{column}_{part}"] = _csv_number(getattr(entry[column], part))
            writer.writerow(flat)


def _csv_number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"


def _cell(entry: dict[str, Any], column: str) -> str:
    """A table cell: a p-value, or an interval (3 digits for quality and differences)."""
    if column.endswith(P_VALUES):
        return _p_text(entry.get(column, math.nan))
    difference = "_vs_" in column or "_difference" in column
    return entry[column].format(3 if column in QUALITY or difference else 1)


def _p_text(p: float) -> str:
    if math.isnan(p):
        return ""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _with(rows: list[dict[str, Any]], column: str) -> bool:
    """Whether a finished run of the sweep has ``column``."""
    return any(r.get(column) is not None for r in rows)


def _with_last_rounds(rows: list[dict[str, Any]]) -> list[str]:
    """``last_rounds_accuracy`` when the runs scored more than their final model on test."""
    several = any(r.get("test_rounds", 1) > 1 for r in rows)
    return ["last_rounds_accuracy"] if several else []


def comparison_markdown(
    rows: list[dict[str, Any]],
    summaries: list[dict[str, Any]],
    sweep: Sweep,
    pairs: list[dict[str, Any]],
) -> str:
    """The per-run table over seeds (mean ± 95% interval half-width), the table of the
    sweep's ``pairs`` and the per-seed table."""
    lines = []
    if len(sweep.seeds) > 1:
        quality = list(GENERATION_QUALITY) if is_generation(rows) else []
        last_rounds = [] if quality else _with_last_rounds(rows)
        on_clients = list(CLIENT_COLUMNS[:2]) if _with(rows, CLIENT_COLUMNS[0]) else []
        compared = [*(quality or ["final_accuracy", *last_rounds]), *on_clients]
        columns = [*(quality or ["final_accuracy", *last_rounds, "best_accuracy"]), "final_loss"]
        columns += on_clients
        bootstrap = f"{compared[0]}_vs_baseline_bootstrap"
        with_bootstrap = any(s.get(bootstrap) and s[bootstrap].n for s in summaries)
        differences = [*compared, "final_loss"]
        if sweep.baseline is not None:
            columns += [f"{m}_vs_baseline" for m in differences]
            columns += [bootstrap] if with_bootstrap else []
            columns += [f"{compared[0]}_vs_baseline{p}" for p in P_VALUES]
        columns += ["rounds_to_target", "mb_down", "mb_up", "seconds"]
        if any(r.get("simulated_seconds") for r in rows):  # the device clock ran
            columns[-1:-1] = ["simulated_to_target", "simulated_seconds", "stragglers"]
        if any(r.get("pruned_replies") for r in rows):  # a client pruned its rank
            columns[-1:-1] = ["pruned_replies"]
        on_validation = any(r.get("evaluated_on") == "validation" for r in rows)
        lines += [
            "Mean ± 95% interval (Student t) over the seeds each run finished (`seeds` counts"
            f" them, of the sweep's {', '.join(map(str, sweep.seeds))})"
            + (
                f"; `_vs_baseline`: paired difference to `{sweep.baseline}`, same seeds."
                if sweep.baseline is not None
                else "."
            )
            + (
                f" `{bootstrap}`: the same difference with a paired bootstrap interval over"
                " the test examples (each seed's examples resampled, 2.5-97.5 percentiles),"
                " which the seed interval does not cover."
                if with_bootstrap
                else ""
            )
            + " Intervals are per comparison, uncorrected for multiple comparisons."
            + (
                f" `_p`: the paired t-test's two-sided p-value of a difference in {compared[0]};"
                " `_p_holm`: the same adjusted by Holm's method over every such difference in"
                " this file (each run's to the baseline, each pair's): a verdict at a"
                " family-wise 5% reads it against 0.05."
                if sweep.baseline is not None or pairs
                else ""
            )
            + (
                " `final_*`: the final model on the test split; `best_*` and rounds to target:"
                " on the validation split."
                if on_validation
                else ""
            )
            + (
                " `last_rounds_accuracy`: the mean test accuracy of the last"
                f" {max(r.get('test_rounds', 1) for r in rows)} rounds' global models."
                if last_rounds
                else ""
            )
            + (
                " `final_client_accuracy_mean`/`_worst10`: federated evaluation of the final"
                " model, each client on its own test split (the mean over clients, the mean of"
                " the worst 10%)."
                if on_clients
                else ""
            ),
            "",
            "| run | strategy | seeds | " + " | ".join(columns) + " |",
            "|---|---|---|" + "---|" * len(columns),
        ]
        for summary in summaries:
            cells = [summary["run"], summary["strategy"], str(summary["seeds"])]
            for column in columns:
                text = _cell(summary, column)
                if column.endswith("_to_target") and summary["seeds"]:
                    text = f"{text} ({summary['reached_target']}/{summary['seeds']} reached)"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        if pairs:
            pair_columns = [f"{m}_difference" for m in differences]
            pair_columns += [f"{compared[0]}_difference_bootstrap"] if with_bootstrap else []
            pair_columns += [f"{compared[0]}_difference{p}" for p in P_VALUES]
            lines += [
                "",
                "Pairs (`pairs`): run − reference, paired by the seeds both finished; the same"
                " figures, intervals and p-values as the differences to the baseline.",
                "",
                "| run | reference | seeds | " + " | ".join(pair_columns) + " |",
                "|---|---|---|" + "---|" * len(pair_columns),
            ]
            for pair in pairs:
                cells = [pair["run"], pair["reference"], str(pair["seeds"])]
                cells += [_cell(pair, column) for column in pair_columns]
                lines.append("| " + " | ".join(cells) + " |")
        selected = [s for s in summaries if "lr" in s]
        if selected:
            lines += [
                "",
                f"Step sizes chosen on the validation split ({sweep.select_rounds} rounds at "
                f"seed {sweep.select_seed} a candidate): "
                + "; ".join(
                    f"`{s['run']}` train.lr {s['lr']:g} ({s['selection_runs']} runs)"
                    for s in selected
                )
                + ".",
            ]
        lines += ["", "Per seed:", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ["" if row.get(c) is None else str(row.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if sweep.target is not None:
        metric = sweep.target_metric
        lines.append(
            f"\nrounds_to_target, simulated_to_target: the first round with {metric.key} "
            f"{'>=' if metric.higher_is_better else '<='} {sweep.target}, and the simulated "
            "device seconds until its end"
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
