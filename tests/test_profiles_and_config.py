"""Device profiles and the run-config schema: parsing, assignment, and clear errors."""

from __future__ import annotations

import pytest

from hetfed.config import RunSettings, known_keys, parse_run_config
from hetfed.errors import ConfigError
from hetfed.profiles import load_profiles, parse_profiles, ratio_counts
from strategies.hetlora import HetLoRAOptions

PROFILES = """
tiers:
  phone: {rank: 2, memory-gb: 4}
  laptop: {rank: 4}
  workstation: {rank: 8, bandwidth-mbps: 500}
assignment:
  ratios: {phone: 6, laptop: 3, workstation: 1}
"""


def test_ratios_assign_contiguous_blocks_that_sum_exactly():
    profiles = parse_profiles(PROFILES)
    tiers = [profiles.tier_for_partition(p, 10).name for p in range(10)]
    assert tiers == ["phone"] * 6 + ["laptop"] * 3 + ["workstation"]
    for total in (1, 7, 10, 33, 500):
        counts = ratio_counts({"a": 6, "b": 3, "c": 1}, total)
        assert sum(counts.values()) == total
        assert all(abs(counts[k] - total * r / 10) < 1 for k, r in (("a", 6), ("b", 3), ("c", 1)))
    assert (profiles.min_rank, profiles.max_rank) == (2, 8)


def test_by_partition_assignment_and_node_config_tier():
    profiles = parse_profiles(
        "tiers: {a: {rank: 1}, b: {rank: 3}}\nassignment: {by-partition: [b, a, b]}"
    )
    assert [profiles.tier_for_partition(p, 3).rank for p in range(3)] == [3, 1, 3]
    assert profiles.tier("a").rank == 1
    with pytest.raises(ConfigError, match="'zz'.*a, b"):
        profiles.tier("zz")
    with pytest.raises(ConfigError, match="one tier per partition"):
        profiles.tier_for_partition(0, 4)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("tiers: {a: {rank: 0}}", "tiers.a.rank", "0"),
        ("tiers: {a: {rank: two}}", "tiers.a.rank", "'two'"),
        ("tiers: {a: {rank: 2, colour: red}}", "tiers.a.colour", "'red'"),
        ("tiers: {a: {memory-gb: 2}}", "tiers.a.rank", "None"),
        ("tiers: {a: {rank: 2}}\nassignment: {ratios: {b: 1}}", "assignment.ratios.b", "1"),
        (
            "tiers: {a: {rank: 2}}\nassignment: {by-partition: [a, x]}",
            "assignment.by-partition[1]",
            "'x'",
        ),
        ("tiers: {a: {rank: 2}}\nassignment: {both: 1}", "assignment", "{'both': 1}"),
        ("tierz: {}", "tiers", "None"),
        ("tiers: [", "<document>", "unparsable"),
    ],
)
def test_bad_profiles_name_file_key_and_value(text, key, value):
    with pytest.raises(ConfigError) as info:
        parse_profiles(text, source="my-profiles.yaml")
    message = str(info.value)
    assert message.startswith("my-profiles.yaml: key") and f"'{key}'" in message
    assert value in message


def test_missing_profile_file(tmp_path):
    with pytest.raises(ConfigError, match="'profiles'.*nope.yaml"):
        load_profiles(tmp_path / "nope.yaml")


def test_run_config_parses_sections_and_strategy_options():
    settings, options = parse_run_config(
        {
            "num-server-rounds": 3,
            "train.local-steps": 4,
            "lora.alpha": 8,
            "model.name": "x",
            "hetlora.prune-gamma": 0.5,
            "hetlora.prune": False,
        },
        HetLoRAOptions,
        "hetlora",
    )
    assert settings.num_server_rounds == 3 and settings.train.local_steps == 4
    assert settings.lora.alpha == 8.0 and settings.model.name == "x"
    assert options == HetLoRAOptions(prune=False, prune_gamma=0.5)
    assert "train.local-steps" in known_keys(RunSettings)


@pytest.mark.parametrize(
    ("config", "key", "allowed"),
    [
        ({"num-server-round": 3}, "num-server-round", "known keys"),
        ({"fedit.rank": 3}, "fedit.rank", "known keys"),  # another strategy's option
        ({"train.local-steps": "10"}, "train.local-steps", "an integer"),
        ({"train.local-steps": 2.5}, "train.local-steps", "an integer"),
        ({"hetlora.prune": 1}, "hetlora.prune", "true or false"),
        ({"train.lr": 0}, "train.lr", "(0, 1)"),
        ({"fraction-train": 1.5}, "fraction-train", "(0, 1]"),
        ({"hetlora.weighting": "magic"}, "hetlora.weighting", "sparsity"),
        ({"model.pooling": "max"}, "model.pooling", "mean, cls"),
        ({"lora.target-modules": " , "}, "lora.target-modules", "comma-separated"),
        ({"faults.fraction": -0.1}, "faults.fraction", "[0, 1]"),
        ({"faults.kinds": "raise,explode"}, "faults.kinds", "timeout, nan"),
        ({"min-train-replies": 0}, "min-train-replies", "[1, min-available-nodes"),
        ({"too-few-replies": "wait"}, "too-few-replies", "retry or skip"),
        ({"max-retries": -1}, "max-retries", ">= 0"),
        ({"max-update-norm": -1.0}, "max-update-norm", ">= 0"),
        ({"resume": 2}, "resume", "true or false or a string"),
        ({"resume": ""}, "resume", "a results folder"),
        ({"test-rounds": 6, "num-server-rounds": 5}, "test-rounds", "[1, num-server-rounds (5)]"),
        ({"test-rounds": 0}, "test-rounds", "[1, num-server-rounds"),
    ],
)
def test_bad_run_config_names_key_value_and_allowed(config, key, allowed):
    with pytest.raises(ConfigError) as info:
        parse_run_config(config, HetLoRAOptions, "hetlora")
    assert info.value.key == key
    assert allowed in str(info.value) and repr(config[key]) in str(info.value)


def test_clients_parse_leniently_but_still_type_check():
    settings, _ = parse_run_config({"hetlora.prune": True, "seed": 3}, strict=False)
    assert settings.seed == 3
    with pytest.raises(ConfigError):
        parse_run_config({"seed": "3"}, strict=False)
