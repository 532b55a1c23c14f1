"""The quickstart exactly as a user runs it: MiniLM on BBC News, 10 clients, HetLoRA (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from peft import PeftModel

from hetfed.data import load_splits
from hetfed.data_config import DataConfig
from hetfed.models import ModelConfig, build_classifier
from hetfed.results import read_metrics
from hetfed.training import encode, evaluate
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_quickstart_reaches_target_accuracy_and_writes_results(flower_home, tmp_path):
    env = {**os.environ, "FLWR_HOME": str(flower_home)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tooling.cli", "run", str(REPO / "scenarios" / "quickstart")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    results = tmp_path / "results" / "quickstart"
    rounds = read_metrics(results)
    summary = json.loads((results / "summary.json").read_text())
    # its time is printed, not asserted: a shared machine stretches it (443 s beside a sweep,
    # about 240 s quiet); the README's figure is measured on a fresh clone
    print(f"quickstart: {seconds:.0f} s, accuracy by round {[r['accuracy'] for r in rounds]}")
    assert rounds[-1]["accuracy"] >= 0.85
    assert summary["final_accuracy"] == rounds[-1]["accuracy"]
    assert sorted(set(summary["node_budgets"].values())) == ["laptop", "phone", "workstation"]
    assert (results / "accuracy.png").is_file()

    splits = load_splits(DataConfig())
    base, tokenizer = build_classifier(ModelConfig(), len(splits.label_names), seed=42)
    model = PeftModel.from_pretrained(base, results / "adapter")
    test = encode(list(splits.test["text"]), list(splits.test["label"]), tokenizer, 64)
    accuracy, _ = evaluate(model, test, batch_size=64)
    assert accuracy == pytest.approx(rounds[-1]["accuracy"], abs=1e-9)
