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

from hetfed.adapters import AdapterHost
from hetfed.checkpoint import load_checkpoint
from hetfed.data import load_splits
from hetfed.data_config import DataConfig
from hetfed.models import ModelConfig, build_classifier, build_model
from hetfed.results import read_metrics
from hetfed.training import encode, encode_for_task, evaluate
from server_apps.lora_server import export_global
from server_apps.run_plan import plan_run
from tests.conftest import TINY_PROFILES, assert_same_adapter, learned_rounds, write_scenario
from tooling.scenarios import OFFLINE_ENV, run_status

# Options some strategies need beyond the tiny scenario's.
EXTRA_CONFIG = {
    "helora-kd": {"data.server-examples": 64},
    "fedsa-lora": {"fraction-evaluate": 1.0, "data.local-test-fraction": 0.25},
    "fim-hla": {
        "data.server-examples": 16,
        "fim-hla.examples": 16,
        "fim-hla.period": 1,
        "fim-hla.first-round": 1,
    },
}
# Layer methods run on tiers that train 1 or 2 of the tiny model's 2 blocks.
LAYER_PROFILES = """\
tiers:
  small: {rank: 4, layers: 1}
  medium: {rank: 4, layers: 1}
  large: {rank: 4, layers: 2}
assignment:
  ratios: {small: 2, medium: 1, large: 1}
"""
LAYER_METHODS = ("gd-hla", "rgd-hla", "fim-hla", "fedra")
# Every method runs end to end: the default run takes HetLoRA's (test_hetlora_end_to_end), CI's
# slow job every other method (each way of exporting included: FLoRA's merged base deltas,
# HeLoRA-KD's largest group) and the runs of one option each (rsLoRA, a round deadline, the
# instruction task), so that the default run stays near 10 minutes on 2 cores.
SLOW = pytest.mark.slow


def exported_accuracy(results: Path, config: dict) -> float:
    """Accuracy of ``results/adapter`` loaded with plain peft on a freshly built base model."""
    splits = load_splits(
        DataConfig(
            source=config["data.source"], server_examples=config.get("data.server-examples", 0)
        )
    )
    cfg = ModelConfig(name=config["model.name"], max_length=config["model.max-length"])
    base, tokenizer = build_classifier(cfg, len(splits.label_names), seed=config["seed"])
    model = PeftModel.from_pretrained(base, results / "adapter")
    test = encode(list(splits.test["text"]), list(splits.test["label"]), tokenizer, cfg.max_length)
    return evaluate(model, test, batch_size=64)[0]


def export_from_checkpoint(results: Path, scenario: Path, out: Path) -> Path:
    """What a new ServerApp process exports straight from ``results/checkpoint.npz``: onto a
    freshly built base model, with no round trained and no adapter activated before."""
    checkpoint = load_checkpoint(results)
    plan = plan_run(checkpoint.run_config, scenario)
    strategy = plan.build_strategy()
    strategy.load_state_dict(checkpoint.strategy_state)
    labels = load_splits(plan.settings.data).label_names
    model, _ = build_model(plan.settings.model, len(labels), plan.settings.seed)
    return export_global(strategy, AdapterHost(model), checkpoint.state, out / "adapter", {})


def test_hetlora_end_to_end(run_scenario, tiny_config):
    proc, results = run_scenario(tiny_config)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "finished:completed" in proc.stdout
    port = os.environ["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]  # this test session's (flower_home)
    assert f"hetfed: this run goes to a new local SuperLink on 127.0.0.1:{port}" in proc.stdout or (
        f"hetfed: this run goes to the local SuperLink on 127.0.0.1:{port}" in proc.stdout
    )
    assert "hetfed: warning" not in proc.stderr
    assert "ranks [2, 2, 4, 8]" in proc.stdout  # each tier trains at its own rank
    rounds = read_metrics(results)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2
    assert all(r["replied"] == 4 and r["failed"] == 0 for r in rounds[1:])
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in rounds[1:])
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final_accuracy"] == rounds[-1]["accuracy"]  # no validation: test each round
    assert summary["evaluated_on"] == "test" and {r["split"] for r in rounds} == {"test"}
    examples = [json.loads(line) for line in (results / "test_examples.jsonl").open()]
    assert sum(e["correct"] for e in examples) / len(examples) == summary["final_accuracy"]
    losses = sum(e["loss"] * e["targets"] for e in examples) / sum(e["targets"] for e in examples)
    assert losses == pytest.approx(summary["final_loss"], rel=1e-5)
    assert sorted(summary["node_budgets"].values()) == ["large", "medium", "small", "small"]
    assert (results / "accuracy.png").stat().st_size > 1000
    assert exported_accuracy(results, tiny_config) == pytest.approx(rounds[-1]["accuracy"])


@SLOW
def test_a_run_with_a_validation_split_reads_test_for_the_final_model_only(
    run_scenario, tiny_config
):
    """data.validation-examples: every round is evaluated on the validation split (the best
    value is read there), the final model on the test split (what the exported adapter
    scores on test); with test-rounds = 2 the last two rounds' models are also scored on test,
    and summary.json has their mean."""
    config = {**tiny_config, "data.validation-examples": 60, "test-rounds": 2}
    proc, results = run_scenario(config)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rounds = read_metrics(results)
    assert [r["split"] for r in rounds] == ["validation"] * 4
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2  # it learned, on validation
    summary = json.loads((results / "summary.json").read_text())
    assert summary["evaluated_on"] == "validation"
    assert summary["best_accuracy"] == max(r["accuracy"] for r in rounds)
    assert rounds[summary["best_round"]]["accuracy"] == summary["best_accuracy"]
    assert summary["final_accuracy"] == pytest.approx(exported_accuracy(results, config))
    on_test = [r["test_accuracy"] for r in rounds]
    assert on_test[:2] == [None, None] and on_test[-1] == summary["final_accuracy"]
    assert summary["last_rounds_accuracy"] == pytest.approx(sum(on_test[2:]) / 2)


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param("fedit", marks=SLOW),
        pytest.param("zeropad", marks=SLOW),
        pytest.param("helora-pad", marks=SLOW),
        pytest.param("rbla", marks=SLOW),
        pytest.param("flexlora", marks=SLOW),
        pytest.param("flora", marks=SLOW),
        pytest.param("helora-kd", marks=SLOW),
        pytest.param("gd-hla", marks=SLOW),
        pytest.param("rgd-hla", marks=SLOW),
        pytest.param("fim-hla", marks=SLOW),
        pytest.param("florist", marks=SLOW),
        pytest.param("raflora", marks=SLOW),
        pytest.param("lora-fair", marks=SLOW),
        pytest.param("fedex-lora", marks=SLOW),
        pytest.param("fedra", marks=SLOW),
    ],
)
def test_strategy_learns_end_to_end(run_scenario, tiny_config, tmp_path, strategy):
    """Each method learns through flwr run, and its adapter reloads with plain peft to the
    accuracy the server measured. Exported again straight from the run's checkpoint in a fresh
    model (each way a method exports: a plain adapter, FLoRA's deltas merged into one, the
    largest of HeLoRA-KD's groups), it is the run's adapter bit for bit."""
    config = {
        **tiny_config,
        "strategy": strategy,
        "num-server-rounds": 2,
        **EXTRA_CONFIG.get(strategy, {}),
    }
    profiles = LAYER_PROFILES if strategy in LAYER_METHODS else TINY_PROFILES
    proc, results = run_scenario(config, profiles)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rounds = read_metrics(results)
    assert [r["replied"] for r in rounds] == [0, 4, 4]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.1
    assert exported_accuracy(results, config) == pytest.approx(rounds[-1]["accuracy"])
    again = tmp_path / "from-checkpoint"
    export_from_checkpoint(results, tmp_path / "scenario", again)
    assert_same_adapter(again, results, atol=0)


@SLOW
def test_rslora_scaling_end_to_end(run_scenario, tiny_config):
    """HetLoRA under rsLoRA's scaling: clients build alpha / sqrt(r) adapters through peft, the
    exported global adapter says use_rslora and reloads with plain peft to the same accuracy."""
    config = {**tiny_config, "num-server-rounds": 2, "lora.scaling": "rslora"}
    proc, results = run_scenario(config)
    rounds = learned_rounds(proc, results)
    assert len(rounds) == 3
    adapter_config = json.loads((results / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_rslora"] is True and adapter_config["r"] == 8
    assert exported_accuracy(results, config) == pytest.approx(rounds[-1]["accuracy"])


DEADLINE_PROFILES = """\
tiers:
  small: {rank: 2, compute-gflops: 100, bandwidth-mbps: 0.001}
  medium: {rank: 4, compute-gflops: 100, bandwidth-mbps: 100, latency-ms: 20}
  large: {rank: 8, compute-gflops: 1000, bandwidth-mbps: 100}
assignment:
  ratios: {small: 2, medium: 1, large: 1}
"""


@SLOW
def test_a_round_deadline_drops_the_stragglers_end_to_end(run_scenario, tiny_config):
    """The two small devices send at 1 kbit/s: their few kilobytes miss the 10 s deadline, so
    every round goes on with the other two, waits the full deadline on the simulated clock,
    and metrics.jsonl carries it."""
    config = {**tiny_config, "num-server-rounds": 2, "round-deadline": 10.0}
    proc, results = run_scenario(config, DEADLINE_PROFILES)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 straggler(s) left out" in proc.stdout and "(tiers small, small)" in proc.stdout
    rounds = read_metrics(results)
    assert [(r["stragglers"], r["sampled"], r["replied"]) for r in rounds] == [
        (0, 0, 0),
        (2, 2, 2),
        (2, 2, 2),
    ]
    assert [r["simulated_seconds"] for r in rounds] == [0.0, 10.0, 10.0]
    assert [r["simulated_total"] for r in rounds] == [0.0, 10.0, 20.0]
    summary = json.loads((results / "summary.json").read_text())
    assert (summary["simulated_seconds"], summary["stragglers"]) == (20.0, 4)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]


@SLOW
def test_instruction_task_end_to_end(run_scenario, tiny_config):
    """A causal LM (tiny random LLaMA) instruction-tuned through flwr run: per-client ranks,
    only LoRA factors travel, the answer loss falls, and the exported adapter is plain peft."""
    config = {
        **tiny_config,
        "model.name": "tiny-random-llama",
        "model.task": "instruction",
        "model.max-length": 40,
        "lora.target-modules": "q_proj,k_proj,v_proj,o_proj",
        "train.eval-batch-size": 64,
        "num-server-rounds": 2,
    }
    # two overrides of one section both arrive (flwr merges separate flags shallowly)
    overrides = ("train.local-steps=15", "train.eval-batch-size=32")
    proc, results = run_scenario(config, overrides=overrides)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    train = json.loads((results / "summary.json").read_text())["settings"]["train"]
    assert (train["local_steps"], train["eval_batch_size"]) == (15, 32)
    assert "ranks [2, 2, 4, 8]" in proc.stdout
    rounds = read_metrics(results)
    assert [r["replied"] for r in rounds] == [0, 4, 4]
    assert rounds[-1]["loss"] < rounds[0]["loss"] / 2  # mean cross-entropy per answer token
    splits = load_splits(DataConfig(source=config["data.source"]))
    cfg = ModelConfig(name="tiny-random-llama", task="instruction", max_length=40)
    base, tokenizer = build_model(cfg, len(splits.label_names), seed=config["seed"])
    model = PeftModel.from_pretrained(base, results / "adapter")
    assert not any("classifier" in name for name, _ in model.named_parameters())
    test = encode_for_task(
        cfg, list(splits.test["text"]), list(splits.test["label"]), splits.label_names, tokenizer
    )
    accuracy, loss = evaluate(model, test, batch_size=64)
    assert (accuracy, loss) == pytest.approx((rounds[-1]["accuracy"], rounds[-1]["loss"]), rel=1e-4)


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
    assert proc.returncode == 0  # the reason hetfed run checks the status
    run_id = re.search(r"Successfully started run (\d+)", proc.stdout).group(1)
    assert run_status(run_id, env) == "finished:failed"
    assert "no-such-method" in proc.stdout and "registered strategy" in proc.stdout
