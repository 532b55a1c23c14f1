"""A device's own data (node-config data-path) is labelled with the run's label ids."""

from __future__ import annotations

import csv

import pytest

from client_apps.local_training import server_label_ids
from hetfed.config import RunSettings
from hetfed.data import DataConfig, load_splits
from hetfed.errors import ConfigError


def write(folder, rows):
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    return folder


def test_device_labels_follow_the_run_by_name(tmp_path):
    run = write(tmp_path / "run", [(f"t{i}", name) for i, name in enumerate("abcabc")])
    device = write(tmp_path / "device", [("x", "c"), ("y", "b"), ("z", "c")])
    settings = RunSettings(data=DataConfig(source=str(run)))
    local = DataConfig(source=str(device))
    local_labels = list(load_splits(local).train["label"])
    names = load_splits(local).label_names  # ["b", "c"]: ids 0, 1 on the device
    mapped = server_label_ids(settings, local, local_labels)
    assert [names[i] for i in local_labels] == [["a", "b", "c"][i] for i in mapped]
    assert set(mapped) <= {1, 2}


def test_device_labels_unknown_to_the_run_are_refused(tmp_path):
    run = write(tmp_path / "run", [("t", "a"), ("u", "b")] * 3)
    device = write(tmp_path / "device", [("x", "a"), ("y", "zebra")] * 3)
    settings = RunSettings(data=DataConfig(source=str(run)))
    local = DataConfig(source=str(device))
    with pytest.raises(ConfigError, match="zebra"):
        server_label_ids(settings, local, list(load_splits(local).train["label"]))


def test_tier_auto_picks_the_largest_tier_that_fits_measured_memory():
    from client_apps.lora_client import available_memory_gb, node_tier
    from hetfed.profiles import parse_profiles

    profiles = parse_profiles(
        "tiers: {s: {rank: 2, memory-gb: 2}, m: {rank: 4, memory-gb: 8},"
        " l: {rank: 8, memory-gb: 64}}"
    )
    assert [profiles.tier_for_memory(gb).name for gb in (1, 2, 7.9, 8, 500)] == [
        "s",
        "s",
        "s",
        "m",
        "l",
    ]
    measured = available_memory_gb()
    assert measured > 0
    assert node_tier({"tier": "auto"}, profiles) == profiles.tier_for_memory(measured)
    assert node_tier({"tier": "l", "partition-id": 0, "num-partitions": 1}, profiles).name == "l"
    with pytest.raises(ConfigError, match="memory-gb"):
        node_tier({"tier": "auto"}, parse_profiles("tiers: {a: {rank: 2}}"))
