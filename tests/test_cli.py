"""The hetfed command: strategy listing and early, clear errors for bad scenarios."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from hetfed.checkpoint import Checkpoint, save_checkpoint
from tests.conftest import REPO, TINY_PROFILES, write_scenario
from tooling.cli import main, parser

RANK_METHODS = [
    "fedit",
    "hetlora",
    "zeropad",
    "helora-pad",
    "helora-kd",
    "flora",
    "flexlora",
    "rbla",
    "florist",
    "raflora",
    "lora-fair",
    "fedex-lora",
]


def test_strategies_lists_every_rank_method(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in RANK_METHODS:
        assert f"\n{name} " in out
    assert "BROKEN" not in out
    assert "strategies.hetlora:HetLoRA" in out


def test_packaged_scenarios_check(capsys):
    for name in ("quickstart", "rank-padding", "rank-exact", "rank-distillation"):
        assert main(["check", str(REPO / "scenarios" / name)]) == 0
    assert "ok: strategy hetlora" in capsys.readouterr().out


def test_packaged_scenarios_on_shared_data_check(shared_data, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # their data.source is ../shared/data/..., relative to the checkout
    for name in ("banking77-ranks", "banking77-layers", "helora-sst2"):
        assert main(["check", str(REPO / "scenarios" / name)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "profiles", "expected"),
    [
        ({"strategy": "nope"}, TINY_PROFILES, ["'strategy'", "'nope'", "hetlora", "flexlora"]),
        ({"train.local-step": 3}, TINY_PROFILES, ["'train.local-step'", "known keys"]),
        ({"data.source": "/no/such/folder"}, TINY_PROFILES, ["'data.source'", "/no/such/folder"]),
        ({"lora.target-modules": "qkv"}, TINY_PROFILES, ["'lora.target-modules'", "query"]),
        ({}, "tiers: {a: {rank: 0}}", ["tiers.a.rank", "0", ">= 1"]),
        ({}, "tiers: {a: {rank: 500}}", ["tiers.a.rank", "500", "[1, 32]"]),
        ({}, "tiers: {a: {rank: 2}}\nassignment: {ratios: {b: 1}}", ["assignment.ratios.b"]),
        ({"profiles": "missing.yaml"}, TINY_PROFILES, ["'profiles'", "missing.yaml"]),
        ({"faults.fraction": 2}, TINY_PROFILES, ["'faults.fraction'", "[0, 1]"]),
        ({"too-few-replies": "wait"}, TINY_PROFILES, ["'too-few-replies'", "retry or skip"]),
        ({"resume": 1}, TINY_PROFILES, ["'resume'", "true or false or a string"]),
    ],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_scenarios_fail_with_key_value_and_allowed(
    tmp_path, capsys, config, profiles, expected, command
):
    """``hetfed run`` refuses them too, before Flower starts or any model is loaded."""
    base = {"strategy": "hetlora", "model.name": "tiny-random-bert", "profiles": "profiles.yaml"}
    folder = write_scenario(tmp_path / "s", {**base, **config}, profiles)
    assert main([command, str(folder)]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_override_of_an_unknown_key_is_refused(capsys):
    assert main(["check", str(REPO / "scenarios" / "quickstart"), "-c", "num-rounds=3"]) == 2
    assert "'num-rounds'" in capsys.readouterr().err


def test_override_with_an_unquoted_string_is_a_clear_error(capsys):
    assert main(["check", str(REPO / "scenarios" / "quickstart"), "-c", "results-dir=out/x"]) == 2
    err = capsys.readouterr().err
    assert "-c results-dir=out/x" in err and "quoted string" in err


def resume_config(results: Path) -> dict:
    """The run config of a tiny scenario that resumes from ``results``."""
    return {
        "strategy": "hetlora",
        "model.name": "tiny-random-bert",
        "profiles": "profiles.yaml",
        "results-dir": str(results),
        "seed": 1,
        "resume": True,
    }


def test_resuming_another_runs_checkpoint_is_refused(tmp_path, capsys):
    config = resume_config(tmp_path / "results")
    folder = write_scenario(tmp_path / "s", config)
    assert main(["check", str(folder)]) == 0  # no checkpoint yet: the run starts at round 1
    written = Checkpoint(1, {}, "hetlora", {}, [], 0.0, {**config, "seed": 2})
    save_checkpoint(tmp_path / "results", written)
    assert main(["check", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "key 'seed' has value 1" in err and "checkpoint.npz" in err
    save_checkpoint(tmp_path / "results", replace(written, run_config=config))
    assert main(["check", str(folder)]) == 0


def test_resuming_with_fewer_rounds_than_the_checkpoint_holds_is_refused(tmp_path, capsys):
    config = {**resume_config(tmp_path / "results"), "num-server-rounds": 3}
    folder = write_scenario(tmp_path / "s", config)
    save_checkpoint(tmp_path / "results", Checkpoint(3, {}, "hetlora", {}, [], 0.0, config))
    assert main(["check", str(folder)]) == 0  # its last round: the results are written again
    assert main(["check", str(folder), "-c", "num-server-rounds=2"]) == 2
    err = capsys.readouterr().err
    assert "key 'num-server-rounds' has value 2" in err and "an integer >= 3" in err
    assert "checkpoint.npz" in err


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        (["sweep", "s.yaml", "--seeds", "1,x"], "comma-separated integer seeds"),
        (["costs", "scenarios/quickstart", "--ranks", "0,2"], "comma-separated integers >= 1"),
        (["bench", "--items", "1,8"], "comma-separated items among 1, 2, 3, 4, 5, 6, 7"),
    ],
)
def test_comma_separated_integers_are_refused_naming_what_is_allowed(argv, allowed, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert allowed in capsys.readouterr().err


def test_comma_separated_integers_are_read_sorted_without_repeats():
    assert parser().parse_args(["costs", "x", "--ranks", "8, 2,2"]).ranks == (2, 8)
    assert parser().parse_args(["sweep", "s.yaml", "--seeds", "0,3,0"]).seeds == [0, 3]
