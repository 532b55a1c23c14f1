"""Faults through ``flwr run`` and the Simulation Engine: failing clients, kill and resume,
resuming a finished run and resuming with more rounds."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetfed.checkpoint import load_checkpoint
from hetfed.results import PROCESS, read_metrics
from tests.conftest import TINY_CONFIG, assert_same_adapter, hetfed_run, write_scenario
from tooling.scenarios import run_status

# The runs that are killed or resumed below, and the uninterrupted run they must end equal to.
RESUMED_CONFIG = {**TINY_CONFIG, "num-server-rounds": 4, "resume": False}


@pytest.fixture(scope="module")
def whole_run(flower_home, topics_corpus, tmp_path_factory) -> tuple[dict, Path]:
    """An uninterrupted 4-round run: its config and its results folder."""
    config = {**RESUMED_CONFIG, "data.source": str(topics_corpus), "results-dir": "whole"}
    folder = tmp_path_factory.mktemp("whole-run")
    proc = hetfed_run(flower_home, folder, write_scenario(folder / "scenario", config))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return config, folder / "whole"


def test_run_with_30_percent_of_clients_failing_completes_and_learns(run_scenario, tiny_config):
    """Each round 3 of 10 clients raise or reply with garbage (NaN, wrong shape, a missing
    array): the run completes on the 7 valid replies and its accuracy rises."""
    config = {
        **tiny_config,
        "min-available-nodes": 10,
        "faults.fraction": 0.3,
        "faults.kinds": "raise,nan,shape,missing-key",
    }
    proc, results = run_scenario(config, num_supernodes=10)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rounds = read_metrics(results)
    assert [(r["sampled"], r["replied"], r["failed"]) for r in rounds[1:]] == [(10, 7, 3)] * 3
    garbage = sum(r["rejected"] for r in rounds)
    assert 0 < garbage < 9  # the other faults raised
    assert proc.stdout.count("rejected reply of client") == garbage
    assert "injected fault: this client raises" in proc.stdout
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2
    summary = json.loads((results / "summary.json").read_text())
    assert summary["failed_replies"] == 9 and summary["rejected_replies"] == garbage


@pytest.mark.slow
def test_clients_that_time_out_are_counted_and_the_round_goes_on(run_scenario, tiny_config):
    config = {
        **tiny_config,
        "num-server-rounds": 2,
        "round-timeout": 45.0,
        "faults.fraction": 0.25,
        "faults.kinds": "timeout",
    }
    proc, results = run_scenario(config)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rounds = read_metrics(results)
    # One client a round sleeps past the timeout; in simulation it also holds a Ray worker, so
    # a client queued behind it may miss the round too (then the round may be retried): at
    # least one reply is lost each round, none is rejected, and no round is skipped.
    for r in rounds[1:]:
        assert r["failed"] >= 1 and r["replied"] >= 1 and not r["skipped"]
        assert r["replied"] + r["failed"] == r["sampled"] == 4 * r["attempts"]
        assert r["rejected"] == 0
        assert r["seconds"] >= 45  # the round waited out its timeout
    assert "this client raises" not in proc.stdout  # late, not failed: only the timeout tells


def _kill_server_app(results: Path) -> int:
    """SIGKILL the process that runs the ServerApp, as the run records it in
    ``results/process.json``, and every process it started (Ray and its workers): a run killed
    mid-flight. Returns the killed pid."""
    pid = json.loads((results / PROCESS).read_text())["pid"]
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, stack = [], [pid]
    while stack:
        tree.append(stack.pop())
        stack.extend(children.get(tree[-1], []))
    for victim in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    return pid


def _kill_and_resume(config: dict, flower_home: Path, tmp_path: Path) -> Path:
    """Run ``config``, kill its ServerApp process (SIGKILL, with everything it started) after
    its first checkpoint, then resume it with ``resume = true``; its results folder."""
    folder = write_scenario(tmp_path / "killed", {**config, "results-dir": "killed"})
    env = {**os.environ, "FLWR_HOME": str(flower_home)}
    command = [sys.executable, "-m", "tooling.cli", "run", str(folder)]
    killed = tmp_path / "killed-results"
    with subprocess.Popen(
        [*command, "-c", f"results-dir={json.dumps(str(killed))}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as runner:
        deadline = time.monotonic() + 300
        while load_checkpoint(killed) is None:
            assert runner.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.1)
        _kill_server_app(killed)
        runner.send_signal(signal.SIGINT)  # the streaming `flwr run` has nothing left to show
        try:
            runner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            runner.kill()
    stopped = load_checkpoint(killed)
    assert stopped.server_round < 4 and not (killed / "summary.json").exists()

    proc = subprocess.run(
        [*command, "-c", f"results-dir={json.dumps(str(killed))}", "-c", "resume=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"resuming after round {stopped.server_round}" in proc.stdout
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_after_round"] == stopped.server_round
    assert [r["round"] for r in read_metrics(killed)] == [0, 1, 2, 3, 4]
    return killed


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_final_adapter(whole_run, flower_home, tmp_path):
    """Uninterrupted run vs. the same run killed after its first checkpoint and resumed: the
    final adapters agree to 1e-6."""
    config, whole = whole_run
    killed = _kill_and_resume(config, flower_home, tmp_path)
    assert_same_adapter(killed, whole)
    assert read_metrics(killed)[-1]["accuracy"] == read_metrics(whole)[-1]["accuracy"]


@pytest.mark.slow
def test_fedsa_lora_clients_keep_their_b_across_a_kill_and_resume(
    flower_home, topics_corpus, tmp_path
):
    """FedSA-LoRA: each client's B lives on the client. Killed and resumed, the run repeats
    the round it was killed in from the B the clients had after the last finished round, so
    every client's own model scores as in the uninterrupted run, round by round (had they
    restarted from B = 0, or from the B of the killed round, the figures would differ)."""
    config = {
        **RESUMED_CONFIG,
        "data.source": str(topics_corpus),
        "strategy": "fedsa-lora",
        "fraction-evaluate": 1.0,
        "data.local-test-fraction": 0.25,
    }
    whole = tmp_path / "whole"
    scenario = write_scenario(tmp_path / "whole-scenario", {**config, "results-dir": "whole"})
    proc = hetfed_run(flower_home, tmp_path, scenario)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (tmp_path / "resumed").mkdir()
    killed = _kill_and_resume(config, flower_home, tmp_path / "resumed")
    expected = [r["client_accuracies"] for r in read_metrics(whole)]
    assert [r["client_accuracies"] for r in read_metrics(killed)] == expected
    assert_same_adapter(killed, whole)
    assert (
        read_metrics(whole)[-1]["client_accuracy_mean"]
        > read_metrics(whole)[1]["client_accuracy_mean"]
    )


RESULT_FILES = ("metrics.jsonl", "accuracy.png", "adapter/adapter_model.safetensors")


@pytest.mark.slow
def test_sigterm_stops_the_flower_run_too(flower_home, tiny_config, tmp_path):
    """``kill`` (SIGTERM) on a `hetfed run` or `hetfed sweep` in the background, where Ctrl-C is
    ignored, stops its Flower run in the SuperLink as Ctrl-C does, instead of leaving it
    training there: the run's status is finished:stopped and it writes no more rounds."""
    folder = write_scenario(tmp_path / "scenario", {**tiny_config, "num-server-rounds": 100})
    results, log = tmp_path / "results", tmp_path / "run.log"
    env = {**os.environ, "FLWR_HOME": str(flower_home)}
    command = [sys.executable, "-m", "tooling.cli", "run", str(folder)]
    with (
        log.open("w") as out,
        subprocess.Popen(
            [*command, "-c", f"results-dir={json.dumps(str(results))}"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # as a background job: the signal reaches hetfed alone
        ) as runner,
    ):
        deadline = time.monotonic() + 300
        while load_checkpoint(results) is None:
            assert runner.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=120) == 130, log.read_text()[-4000:]
    text = log.read_text()
    run_id = re.search(r"Successfully started run (\d+)", text).group(1)
    assert run_status(run_id, env) == "finished:stopped", text[-4000:]
    # the ServerApp learns of the stop within seconds (a tiny run may finish a round or two
    # first); a run left training would go on writing rounds
    rounds = [load_checkpoint(results).server_round]
    for _ in range(6):
        time.sleep(5)
        rounds.append(load_checkpoint(results).server_round)
    assert rounds[-1] == rounds[-3] < 100, rounds
    assert not (results / "summary.json").exists()


@pytest.mark.slow
def test_resuming_a_finished_run_writes_the_same_results_again(whole_run, run_scenario, tmp_path):
    """``resume = true`` once the run has done all its rounds trains nothing (no node is sent
    anything) and completes; its summary.json, accuracy.png and adapter/, deleted before, are
    written again from the checkpoint, equal to what the run wrote (the adapter bit for bit)."""
    config, whole = whole_run
    results = shutil.copytree(whole, tmp_path / config["results-dir"])
    (results / "summary.json").unlink()
    (results / "accuracy.png").unlink()
    shutil.rmtree(results / "adapter")

    proc, _ = run_scenario(config, overrides=("resume=true",))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "resuming after round 4" in proc.stdout
    assert "nothing left to train: round 4 is the last" in proc.stdout
    assert "configure_train" not in proc.stdout and "budgets:" not in proc.stdout
    for name in RESULT_FILES:
        assert (results / name).read_bytes() == (whole / name).read_bytes(), name
    assert_same_adapter(results, whole, atol=0)
    hetfed_json = "adapter/hetfed.json"
    assert (results / hetfed_json).read_bytes() == (whole / hetfed_json).read_bytes()
    # summary.json: the same but for where it is, that this run resumed, and its seconds (the
    # checkpoint's, which end at the last round, plus this run's)
    written = (whole / "summary.json").read_text().replace(str(whole), str(results))
    expected, summary = json.loads(written), json.loads((results / "summary.json").read_text())
    assert (expected.pop("resumed_after_round"), summary.pop("resumed_after_round")) == (None, 4)
    expected.pop("seconds")
    assert summary.pop("seconds") > load_checkpoint(whole).seconds
    assert (expected["settings"].pop("resume"), summary["settings"].pop("resume")) == (False, True)
    assert summary == expected


@pytest.mark.slow
def test_resuming_with_more_rounds_continues_to_the_new_last_round(
    whole_run, run_scenario, tmp_path
):
    """A finished 2-round run resumed with ``num-server-rounds = 4`` trains rounds 3 and 4 only
    and ends with the adapter of the uninterrupted 4-round run (to 1e-6). (Fewer rounds than the
    checkpoint holds are refused: tests/test_cli.py.)"""
    config, whole = whole_run
    short = {**config, "num-server-rounds": 2}
    proc, results = run_scenario(short)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    first = read_metrics(results)

    proc, _ = run_scenario(short, overrides=("resume=true", "num-server-rounds=4"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "resuming after round 2" in proc.stdout
    assert "[ROUND 2/4]" not in proc.stdout and "[ROUND 3/4]" in proc.stdout
    rounds = read_metrics(results)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4] and rounds[:3] == first
    summary = json.loads((results / "summary.json").read_text())
    assert (summary["rounds"], summary["resumed_after_round"]) == (4, 2)
    assert_same_adapter(results, whole)
    assert [r["accuracy"] for r in rounds] == [r["accuracy"] for r in read_metrics(whole)]
