"""Strategy plugins: the FFA-LoRA example package (``examples/hetfed-ffa-lora``) installed like
any third-party plugin, the frozen LoRA factors it relies on, and broken plugins."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from hetfed import adapter_state, seeds, wire
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.data import load_splits
from hetfed.data_config import DataConfig
from hetfed.errors import ConfigError
from hetfed.models import ModelConfig, build_classifier
from hetfed.results import read_metrics
from hetfed.training import Encoded, TrainConfig, train_steps
from strategies.registry import load_strategy
from tests.conftest import REPO
from tests.harness import global_state, make, train_round, trained
from tests.test_end_to_end import exported_accuracy
from tests.test_layers_core import SPEC, twelve_layer_host
from tooling.cli import main

EXAMPLE = REPO / "examples" / "hetfed-ffa-lora"
PACKAGE = "hetfed-ffa-lora"


# ---------------------------------------------------------------- frozen factors on the client
def test_frozen_a_is_bit_identical_after_local_training_and_b_trains():
    host = twelve_layer_host()
    state = host.initial_state(SPEC, seed=1)  # B = 0, as FFA-LoRA starts
    data = Encoded(
        torch.randint(1, 50, (8, 6)), torch.ones(8, 6, dtype=torch.long), torch.randint(0, 3, (8,))
    )
    model = host.set_state(SPEC, state)
    with host.train_only_layers(SPEC, [0, 1]), host.frozen_factors(SPEC, [adapter_state.LORA_A]):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
        train_steps(model, data, TrainConfig(local_steps=3, lr=0.05), seed=0)
    assert trainable and all("lora_B" in n for n in trainable)
    assert all(".layer.0." in n or ".layer.1." in n for n in trainable)
    after = host.get_state(SPEC)
    for key, before in state.items():
        if key.endswith(".lora_A.weight"):
            assert after[key].tobytes() == before.tobytes(), key  # bit for bit
        elif adapter_state.layer_of(key) in (0, 1, None):  # B of the trained blocks, and the head
            assert not np.array_equal(after[key], before), key
    # every factor is trainable again for the next client of this process
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_freezing_an_unknown_factor_is_refused():
    host = twelve_layer_host()
    host.initial_state(SPEC, seed=1)
    with pytest.raises(ValueError, match="lora_C"), host.frozen_factors(SPEC, ["lora_C"]):
        pass


# ---------------------------------------------------------------- the plugin's aggregation
@pytest.fixture
def ffa_lora(monkeypatch):
    """The example's strategy module, imported from its folder (the algebra needs no install)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return importlib.import_module("hetfed_ffa_lora.ffa_lora")


def expected_b(global_b, replies, weights, per_rank_index):
    """FFA-LoRA's B, one rank index at a time: sum over the replies holding index i of
    p_k B_k[:, i], divided by their sum of p_k (per rank index) or not (zero-padding); an
    index that no reply holds keeps its value (per rank index) or is zero (zero-padding)."""
    b = np.zeros(global_b.shape)
    for i in range(global_b.shape[1]):
        holders = [k for k, reply in enumerate(replies) if reply.shape[1] > i]
        total = sum(weights[k] * replies[k][:, i].astype(np.float64) for k in holders)
        if not per_rank_index:
            b[:, i] = total if holders else 0.0
        elif holders:
            b[:, i] = total / sum(weights[k] for k in holders)
        else:
            b[:, i] = global_b[:, i]
    return b


@pytest.mark.parametrize("aggregation", ["per-rank-index", "zero-pad"])
@pytest.mark.parametrize("rejected", [None, 1002], ids=["all-reply", "rank-8-rejected"])
def test_ffa_lora_keeps_a_and_averages_b(ffa_lora, aggregation, rejected):
    rng = np.random.default_rng(1)
    strategy = make(ffa_lora.FFALoRA, ffa_lora.FFALoRAOptions(aggregation=aggregation))
    state = global_state(rng)
    examples = {1000: 3, 1001: 30, 1002: 300}

    def poison(node, arrays):  # a NaN reply is rejected by the base's validation
        if node == rejected:
            arrays["classifier.bias"] = np.full_like(arrays["classifier.bias"], np.nan)
        return arrays

    # The replies' A are random too: the server must never read a client's A.
    reply, sent = trained(rng, n_examples=examples, mutate=poison)
    messages, new = train_round(strategy, state, reply)
    for msg in messages:
        config = msg.content[wire.CONFIG]
        assert list(config[wire.FROZEN]) == [adapter_state.LORA_A]
        # one scaling s = alpha / r_max for every rank: alpha_k = 16 r_k / 8
        assert config[wire.LORA_ALPHA] == 16.0 * config[wire.RANK] / 8
    used = [node for node in sorted(sent) if node != rejected]
    total = sum(examples[node] for node in used)
    weights = [examples[node] / total for node in used]
    global_pairs, global_head = adapter_state.split_state(state)
    new_pairs, new_head = adapter_state.split_state(new)
    for module, (b, a) in global_pairs.items():
        assert new_pairs[module][1].tobytes() == a.tobytes()  # A bit for bit
        replies = [adapter_state.split_state(sent[node])[0][module][0] for node in used]
        want = expected_b(b, replies, weights, aggregation == "per-rank-index")
        np.testing.assert_allclose(new_pairs[module][0], want, rtol=0, atol=1e-6)
    head = sum(w * sent[node]["classifier.bias"] for w, node in zip(weights, used, strict=True))
    np.testing.assert_allclose(new_head["classifier.bias"], head, rtol=0, atol=1e-6)


def test_ffa_lora_options_are_checked(ffa_lora):
    with pytest.raises(ConfigError, match="ffa-lora.aggregation.*'mean'"):
        ffa_lora.FFALoRAOptions(aggregation="mean")


# ---------------------------------------------------------------- installed like any plugin
def _run(*command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, timeout=timeout
    )


def _installed() -> bool:
    try:
        distribution(PACKAGE)
    except PackageNotFoundError:
        return False
    return True


@contextmanager
def plugin_installed() -> Iterator[None]:
    """The example package installed into this interpreter's environment (a real wheel built
    with hatchling, no dependencies, no network); uninstalled afterwards whatever happens."""
    if _installed():
        pytest.fail(f"{PACKAGE} is already installed here; `pip uninstall {PACKAGE}` first")
    try:
        proc = _run("pip", "install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield
    finally:
        _run("pip", "uninstall", "-y", PACKAGE)
        assert not _installed()


def _listed(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines()[1:] if line.strip()}


def test_installed_plugin_is_listed_and_checked_and_gone_after_uninstall():
    with plugin_installed():
        proc = _run("tooling.cli", "strategies")
        assert proc.returncode == 0, proc.stderr
        line = _listed(proc.stdout)["ffa-lora"]
        assert "hetfed_ffa_lora.ffa_lora:FFALoRA" in line and PACKAGE in line
        assert "BROKEN" not in proc.stdout
        proc = _run("tooling.cli", "check", str(EXAMPLE / "scenario"))
        assert proc.returncode == 0, proc.stderr
        assert "ok: strategy ffa-lora" in proc.stdout
    proc = _run("tooling.cli", "strategies")
    assert proc.returncode == 0, proc.stderr
    assert "ffa-lora" not in proc.stdout and "hetlora" in _listed(proc.stdout)


@pytest.fixture
def installed_plugin():
    with plugin_installed():
        yield


def initial_lora_a(config: dict) -> dict[str, np.ndarray]:
    """The A factors of the run's seeded initial global adapter (rank 8), as the ServerApp
    draws them, keyed as in an exported PEFT folder."""
    labels = load_splits(DataConfig(source=config["data.source"])).label_names
    cfg = ModelConfig(name=config["model.name"], max_length=config["model.max-length"])
    base, _ = build_classifier(cfg, len(labels), seed=config["seed"])
    spec = LoraSpec(8, config["lora.alpha"], ("query", "value"))
    seed = seeds.initial_adapter_seed(config["seed"])  # its stream of the run's seed tree
    state = AdapterHost(base).initial_state(spec, seed=seed)
    return {k: v for k, v in state.items() if k.endswith(".lora_A.weight")}


@pytest.mark.slow
def test_plugin_learns_end_to_end(installed_plugin, run_scenario, tiny_config):
    config = {**tiny_config, "strategy": "ffa-lora", "num-server-rounds": 2}
    proc, results = run_scenario(config)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "ranks [2, 2, 4, 8]" in proc.stdout
    rounds = read_metrics(results)
    assert [r["replied"] for r in rounds] == [0, 4, 4]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.1
    assert exported_accuracy(results, config) == pytest.approx(rounds[-1]["accuracy"])
    exported = load_file(results / "adapter" / "adapter_model.safetensors")
    for key, a in initial_lora_a(config).items():
        assert exported[key].tobytes() == a.tobytes(), key  # A never moved from its init


# ---------------------------------------------------------------- broken plugins
BROKEN_ENTRY_POINTS = """\
[hetfed.strategies]
missing = hetfed_no_such_module:Strategy
plain = broken_plugin:Plain
half-done = broken_plugin:HalfDone
misnamed = strategies.rbla:RBLA
hetlora = strategies.zeropad:ZeroPad
"""
BROKEN_MODULE = """\
from strategies.base import LoRAStrategy


class Plain:
    name = "plain"


class HalfDone(LoRAStrategy):
    name = "half-done"
"""


@pytest.fixture
def broken_plugins(tmp_path, monkeypatch):
    """A package ``hetfed-broken-plugin`` whose entry points are broken in every way hetfed
    checks: a dist-info folder on sys.path, found by importlib.metadata like an installed one."""
    info = tmp_path / "hetfed_broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hetfed-broken-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(BROKEN_ENTRY_POINTS)
    (tmp_path / "broken_plugin.py").write_text(BROKEN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_broken_plugins_are_listed_with_their_package_and_hide_no_other(broken_plugins, capsys):
    assert main(["strategies"]) == 0
    rows = _listed(capsys.readouterr().out)
    problems = {
        "missing": "failed to import: ModuleNotFoundError",
        "plain": "is not a subclass of strategies.base.LoRAStrategy",
        "half-done": "does not implement aggregate_lora",
        "misnamed": "registered as 'misnamed' but its name is 'rbla'",
        "hetlora": "registered by more than one package",
    }
    for name, problem in problems.items():
        assert "BROKEN PLUGIN" in rows[name] and problem in rows[name], rows[name]
        assert "hetfed-broken-plugin" in rows[name], rows[name]
    assert "strategies.hetlora:HetLoRA (hetfed)" in rows["hetlora"]
    for name in ("fedit", "zeropad", "rbla"):
        assert "BROKEN" not in rows[name]
    with pytest.raises(ConfigError, match="'missing'.*hetfed-broken-plugin.*ModuleNotFound"):
        load_strategy("missing")
