"""End-to-end runs through ``flwr run`` and Flower's Simulation Engine with a tiny random model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel

from hetfed.cli import OFFLINE_ENV, run_status
from hetfed.data import DataConfig, load_splits
from hetfed.models import ModelConfig, build_classifier
from hetfed.results import read_metrics
from hetfed.training import encode, evaluate
from tests.conftest import write_scenario


@pytest.mark.parametrize("strategy", ["hetlora", "fedit"])
def test_strategy_runs_end_to_end_and_learns(run_scenario, tiny_config, strategy):
    proc, results = run_scenario({**tiny_config, "strategy": strategy})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "finished:completed" in proc.stdout
    rounds = read_metrics(results)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.05
    assert all(r["replied"] == 4 and r["failed"] == 0 for r in rounds[1:])
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in rounds[1:])
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final_accuracy"] == rounds[-1]["accuracy"]
    assert (results / "accuracy.png").stat().st_size > 1000
    tiers = sorted(summary["node_budgets"].values())
    assert tiers == ["large", "medium", "small", "small"]


def test_exported_adapter_reproduces_final_accuracy(run_scenario, tiny_config):
    proc, results = run_scenario(tiny_config)
    assert proc.returncode == 0, proc.stdout[-4000:]
    final = read_metrics(results)[-1]["accuracy"]
    data = DataConfig(source=tiny_config["data.source"])
    splits = load_splits(data)
    cfg = ModelConfig(name="tiny-random-bert", max_length=32)
    base, tokenizer = build_classifier(cfg, len(splits.label_names), seed=tiny_config["seed"])
    model = PeftModel.from_pretrained(base, results / "adapter")
    test = encode(list(splits.test["text"]), list(splits.test["label"]), tokenizer, 32)
    accuracy, _ = evaluate(model, test, batch_size=64)
    assert accuracy == pytest.approx(final, abs=1e-9)


def test_heterogeneous_ranks_reach_each_tier(run_scenario, tiny_config):
    proc, results = run_scenario({**tiny_config, "num-server-rounds": 1})
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "ranks [2, 2, 4, 8]" in proc.stdout


def test_unknown_strategy_fails_before_training(run_scenario, tiny_config):
    proc, _ = run_scenario({**tiny_config, "strategy": "no-such-method"})
    assert proc.returncode == 2
    assert "no-such-method" in proc.stderr and "hetlora" in proc.stderr and "fedit" in proc.stderr


def test_plain_flwr_run_failure_is_seen_in_run_status(flower_home, tmp_path, tiny_config):
    """The ServerApp validates too: plain ``flwr run --stream`` exits 0 on a failed run, and
    the status (what ``hetfed run`` checks) says failed, with the reason in the log."""
    folder = write_scenario(tmp_path / "bad", {**tiny_config, "strategy": "no-such-method"})
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": str(flower_home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run(
        ["flwr", "run", str(folder), "--stream", "--federation-config", "num-supernodes=4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    run_id = re.search(r"Successfully started run (\d+)", proc.stdout).group(1)
    assert run_status(run_id, env) == "finished:failed"
    assert "no-such-method" in proc.stdout and "registered strategy" in proc.stdout
