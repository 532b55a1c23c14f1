"""Sweeps: validation, scenario variants, and a real two-strategy sweep that resumes (slow)."""

from __future__ import annotations

import csv
import os
import tomllib

import pytest

from hetfed.errors import ConfigError
from hetfed.sweep import load_sweep, run_sweep, write_variant
from tests.conftest import write_scenario


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
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, tiny_config, text, key):
    write_scenario(tmp_path / "base", tiny_config)
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sweep(tmp_path / "s.yaml")
    assert info.value.key == key


@pytest.mark.slow
def test_sweep_runs_compares_and_skips_finished_runs(
    tmp_path, tiny_config, flower_home, monkeypatch, capsys
):
    monkeypatch.setenv("FLWR_HOME", str(flower_home))
    monkeypatch.chdir(tmp_path)
    write_scenario(tmp_path / "base", {**tiny_config, "num-server-rounds": 1})
    (tmp_path / "s.yaml").write_text(
        "scenario: base\ntarget-accuracy: 0.3\n"
        "runs: {fedit: {strategy: fedit}, hetlora: {strategy: hetlora},"
        " broken: {strategy: hetlora, hetlora.prune-gamma: 2.0}}\n"
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
