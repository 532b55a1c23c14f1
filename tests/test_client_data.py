"""A device's own data (node-config data-path): labelled with the run's label ids, and read
as the run reads its source."""

from __future__ import annotations

import csv

import pytest

from client_apps.local_training import server_label_ids
from hetfed.config import RunSettings, known_keys, parse_run_config
from hetfed.data import load_splits
from hetfed.data_config import DataConfig
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


def write_articles(folder, articles):
    """A BBC-style folder: one sub-folder per class of .txt files whose first line is a title."""
    for number, (label, title, body) in enumerate(articles):
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"{number:03d}.txt").write_text(f"\n{title}\n\n{body}\n")
    return folder


def test_device_folder_in_a_headlines_run_is_read_as_article_title_pairs(tmp_path):
    articles = [
        (label, f"Title {i} {label}", f"Body {i} of {label}.") for label in "xy" for i in range(10)
    ]
    device = str(write_articles(tmp_path / "device", articles))
    local = DataConfig(source="bbc-news-headlines").on_device(device)
    splits = load_splits(local)
    rows = [
        (split.features["label"].names[label], target, text)
        for split in (splits.train, splits.test)
        for text, label, target in zip(split["text"], split["label"], split["target"], strict=True)
    ]
    assert sorted(rows) == sorted(articles)
    # the same folder in a classification run: whole articles as texts, no targets
    plain = load_splits(DataConfig(source="bbc-news").on_device(device))
    assert plain.train.column_names == ["text", "label"]
    whole = [
        " ".join(text.split()) for split in (plain.train, plain.test) for text in split["text"]
    ]
    assert sorted(whole) == sorted(f"{title} {body}" for _, title, body in articles)


def test_device_file_in_a_headlines_run_is_refused_naming_the_node_key(tmp_path):
    device = write(tmp_path / "device", [("x", "a"), ("y", "b")] * 3)
    with pytest.raises(ConfigError) as info:
        load_splits(DataConfig(source="bbc-news-headlines").on_device(str(device / "train.csv")))
    assert (info.value.key, info.value.source) == ("data-path", "node config")
    assert "sub-folder of .txt articles per class" in str(info.value)


def test_the_device_titles_flag_is_not_a_run_config_key():
    assert not [key for key in known_keys(RunSettings) if "titles" in key]
    with pytest.raises(ConfigError, match="known keys"):
        parse_run_config({"data.-titles-as-targets": True}, strict=True)


def test_tier_auto_picks_the_largest_tier_that_fits_measured_memory():
    """Without the server's needs a tier needs its memory-gb less the reserve, and a device has
    its free memory less the reserve: the same reserve on both sides, so the tier picked is the
    largest memory-gb that the free memory reaches, whatever the reserve."""
    from client_apps.lora_client import available_memory_gb, node_tier
    from hetfed.budgets import tier_from_memory
    from hetfed.profiles import parse_profiles

    tiers = (
        "tiers: {s: {rank: 2, memory-gb: 2}, m: {rank: 4, memory-gb: 8},"
        " l: {rank: 8, memory-gb: 64}}"
    )
    for reserve in (0.25, 0.5, 1.5):
        profiles = parse_profiles(f"{tiers}\nauto: {{memory-reserve-gb: {reserve}}}")
        picked = [tier_from_memory(profiles, gb).name for gb in (1, 2, 7.9, 8, 500)]
        assert picked == ["s", "s", "s", "m", "l"]
    profiles = parse_profiles(tiers)
    measured = available_memory_gb()
    assert measured > 0
    assert node_tier({"tier": "auto"}, profiles) == tier_from_memory(profiles, measured)
    assert node_tier({"tier": "l", "partition-id": 0, "num-partitions": 1}, profiles).name == "l"
    with pytest.raises(ConfigError, match="memory-gb"):
        node_tier({"tier": "auto"}, parse_profiles("tiers: {a: {rank: 2}}"))
