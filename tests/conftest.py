"""Shared fixtures: scenario folders for a tiny model, and runs through the real ``flwr run``."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from hetfed.model_cache import CACHE_ENV
from hetfed.results import read_metrics
from tooling.loopback import free_ports
from tooling.superlink import stop_superlinks_on

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_CONFIG = {
    "strategy": "hetlora",
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "min-train-nodes": 2,
    "min-available-nodes": 4,
    "seed": 7,
    "profiles": "profiles.yaml",
    "results-dir": "results",
    "model.name": "tiny-random-bert",
    "model.max-length": 32,
    "lora.target-modules": "query,value",
    "lora.alpha": 16.0,
    "data.source": "",  # set by the ``tiny_config`` fixture to the generated topics corpus
    "data.partitioner": "iid",
    "train.local-steps": 8,
    "train.batch-size": 16,
    "train.lr": 0.02,
}

# A small labelled corpus that a randomly initialised model can learn in seconds: each text
# mixes words of its topic with common words. Real text (BBC News) is for the real model.
TOPICS = {
    "film": "movie actor director award cinema star festival drama comedy oscar",
    "money": "bank market shares profit stock price investor trade economy rate",
    "sport": "match goal team coach season league player score win cup",
    "tech": "software computer phone internet chip network data robot code digital",
    "vote": "election minister party vote parliament policy campaign government law leader",
}
COMMON = "the a of and to in is was for on with said it as at by from".split()


def write_topics_corpus(folder: Path, seed: int = 0, train: int = 600, test: int = 200) -> Path:
    """train.csv/test.csv (columns text,label) of synthetic topic texts."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for _ in range(rows):
                label = rng.choice(sorted(TOPICS))
                words = TOPICS[label].split()
                text = " ".join(
                    rng.choice(words) if rng.random() < 0.7 else rng.choice(COMMON)
                    for _ in range(16)
                )
                writer.writerow([text, label])
    return folder


@pytest.fixture(scope="session")
def topics_corpus(tmp_path_factory) -> Path:
    return write_topics_corpus(tmp_path_factory.mktemp("topics"))


@pytest.fixture
def tiny_config(topics_corpus) -> dict:
    """The run config of a 4-client scenario on the tiny model and the topics corpus."""
    return {**TINY_CONFIG, "data.source": str(topics_corpus)}


TINY_PROFILES = """\
tiers:
  small: {rank: 2}
  medium: {rank: 4}
  large: {rank: 8}
assignment:
  ratios: {small: 2, medium: 1, large: 1}
"""


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else repr(value)


def write_scenario(
    folder: Path,
    config: dict,
    profiles: str = TINY_PROFILES,
    num_supernodes: int = 4,
    simulation: dict | None = None,
) -> Path:
    """A scenario folder like scenarios/quickstart, configured by ``config`` (and
    ``[tool.hetfed.simulation]`` by ``simulation``)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{folder.name}"',
        'version = "1.0.0"',
        'description = "hetfed test scenario"',
        'license = "Apache-2.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "hetfed"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "server_apps.lora_server:app"',
        'clientapp = "client_apps.lora_client:app"',
        "",
        "[tool.flwr.app.config]",
        *[f"{key} = {_toml(value)}" for key, value in config.items()],
        "",
        "[tool.hetfed.simulation]",
        f"num-supernodes = {num_supernodes}",
        *[f"{key} = {_toml(value)}" for key, value in (simulation or {}).items()],
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (folder / "profiles.yaml").write_text(profiles)
    return folder


@pytest.fixture(scope="session", autouse=True)
def model_cache_folder(tmp_path_factory) -> Iterator[Path]:
    """Prepared base models (:mod:`hetfed.model_cache`) go to a folder of this test session, not
    to ~/.cache/hetfed; the processes that tests start inherit it."""
    folder = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one thread (and the bench sets its own threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def server_identity():
    """Flower stamps messages with the running task's identity; give tests one."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


@pytest.fixture(scope="session")
def flower_home(tmp_path_factory):
    """A private FLWR_HOME, and ports of this test session for the local SuperLink that flwr
    starts there (set in the environment the tests' processes inherit), so no test lands on a
    SuperLink that something else left on flwr's default port. That SuperLink is stopped at
    the end."""
    home = tmp_path_factory.mktemp("flwr-home")
    link, control = free_ports(2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(link))
        patch.setenv("FLWR_LOCAL_CONTROL_API_PORT", str(control))
        yield home
    stop_superlinks_on(link)


def hetfed_run(
    flower_home: Path,
    cwd: Path,
    scenario: Path,
    overrides: tuple[str, ...] = (),
    timeout: float = 420,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``hetfed run SCENARIO -c ...`` (which calls ``flwr run``) from ``cwd``, on the local
    SuperLink of ``flower_home`` (in the environment plus ``env``)."""
    env = {**os.environ, **(env or {}), "FLWR_HOME": str(flower_home)}
    command = [sys.executable, "-m", "tooling.cli", "run", str(scenario)]
    for override in overrides:
        command += ["-c", override]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def run_scenario(flower_home, tmp_path):
    """Run a scenario through ``hetfed run`` and return its outcome and results folder."""

    def _run(
        config: dict,
        profiles: str = TINY_PROFILES,
        num_supernodes: int = 4,
        overrides: tuple[str, ...] = (),
        timeout: float = 420,
        simulation: dict | None = None,
    ):
        folder = write_scenario(tmp_path / "scenario", config, profiles, num_supernodes, simulation)
        proc = hetfed_run(flower_home, tmp_path, folder, overrides, timeout)
        return proc, tmp_path / config.get("results-dir", "results")

    return _run


def learned_rounds(
    proc: subprocess.CompletedProcess, results: Path, replies: int = 4, gain: float = 0.1
) -> list[dict]:
    """The rounds of a run that completed, in which every round after the first evaluation got
    ``replies`` replies and rejected none, and the accuracy rose by more than ``gain``."""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rounds = read_metrics(results)
    assert [r["replied"] for r in rounds[1:]] == [replies] * (len(rounds) - 1)
    assert rounds[0]["replied"] == 0 and all(r["rejected"] == 0 for r in rounds)
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + gain
    return rounds


def adapter_tensors(results: Path) -> dict[str, np.ndarray]:
    """The tensors of the PEFT adapter a run exported to ``results/adapter``."""
    return load_file(str(results / "adapter" / "adapter_model.safetensors"))


def peft_config(results: Path) -> dict:
    """``results/adapter/adapter_config.json``, its target modules sorted (peft writes a set, in
    an order that changes from process to process)."""
    config = json.loads((results / "adapter" / "adapter_config.json").read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}


def assert_same_adapter(actual: Path, expected: Path, atol: float = 1e-6) -> None:
    """The adapters exported to ``actual/adapter`` and ``expected/adapter`` agree (to ``atol``;
    0 means bit for bit), and so do their PEFT configs."""
    got, want = adapter_tensors(actual), adapter_tensors(expected)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=atol, err_msg=key)
    assert peft_config(actual) == peft_config(expected)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
