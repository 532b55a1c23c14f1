"""Tests of (input, target) pair sources in hetfed.data, the data of the generation task."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import datasets
import pytest

from hetfed.config import parse_run_config
from hetfed.data import DataSplits, load_partition, load_splits
from hetfed.data_config import DataConfig
from hetfed.data_sources import bbc_news_folder
from hetfed.errors import ConfigError

TOPICS = ("film", "money", "sport")


def write_rows(path: Path, rows: list[dict[str, str | None]]) -> Path:
    """``rows`` as a csv, tsv or jsonl file, by the suffix of ``path``."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path
    with path.open("w", newline="") as handle:
        delimiter = "\t" if path.suffix == ".tsv" else ","
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def pair_rows(n: int) -> list[dict[str, str | None]]:
    """Documents, their summaries (the targets) and a topic (the label)."""
    return [
        {
            "doc": f"document {i} about {TOPICS[i % 3]}",
            "summary": f"sum {i}",
            "topic": TOPICS[i % 3],
        }
        for i in range(n)
    ]


def all_rows(splits: DataSplits) -> list[tuple[str, str, str]]:
    """(input, target, label name) of every row of every split."""
    parts = [s for s in (splits.train, splits.test, splits.server) if s is not None]
    return [
        (text, target, splits.label_names[label])
        for part in parts
        for text, target, label in zip(part["text"], part["target"], part["label"], strict=True)
    ]


def error_of(cfg: DataConfig) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_splits(cfg)
    return info.value


# ---------------------------------------------------------------------------- local pairs


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_pairs_with_explicit_columns(tmp_path, suffix):
    rows = pair_rows(60)
    write_rows(tmp_path / f"train{suffix}", rows[:48])
    write_rows(tmp_path / f"test{suffix}", rows[48:])
    cfg = DataConfig(
        source=str(tmp_path), input_column="doc", target_column="summary", label_column="topic"
    )
    splits = load_splits(cfg)
    assert splits.label_names == sorted(TOPICS)
    assert (len(splits.train), len(splits.test)) == (48, 12)
    for split in (splits.train, splits.test):
        assert split.column_names == ["text", "label", "target"]
        assert split.features["target"] == datasets.Value("string")
    expected = Counter((r["doc"], r["summary"], r["topic"]) for r in rows)
    assert Counter(all_rows(splits)) == expected


def test_target_in_every_split_and_partition(tmp_path):
    rows = pair_rows(90)
    source = write_rows(tmp_path / "pairs.csv", rows)
    cfg = DataConfig(
        source=str(source),
        input_column="doc",
        target_column="summary",
        server_examples=10,
        max_test_examples=9,
    )
    splits = load_splits(cfg)  # the label column "topic" is detected
    assert splits.server is not None
    assert (len(splits.train), len(splits.test), len(splits.server)) == (62, 9, 10)
    for split in (splits.train, splits.test, splits.server):
        assert split.column_names == ["text", "label", "target"]
    targets = {r["doc"]: (r["summary"], r["topic"]) for r in rows}
    assert all(targets[text] == (target, label) for text, target, label in all_rows(splits))
    parts = [load_partition(cfg, i, 3) for i in range(3)]
    assert all(part.column_names == ["text", "label", "target"] for part in parts)
    together = Counter((row["text"], row["target"]) for part in parts for row in part)
    assert together == Counter((row["text"], row["target"]) for row in splits.train)


def test_input_column_joins_columns(tmp_path):
    rows = [{"head": f"h{i}", "body": f"b{i}", "title": f"t{i}"} for i in range(20)]
    cfg = DataConfig(
        source=str(write_rows(tmp_path / "d.jsonl", rows)),
        input_column="head+body",
        target_column="title",
    )
    splits = load_splits(cfg)
    assert sorted(text for text, _, _ in all_rows(splits)) == sorted(
        f"h{i}. b{i}" for i in range(20)
    )
    assert all(target == "t" + text[1:].split(".")[0] for text, target, _ in all_rows(splits))


def test_no_label_column_gives_the_single_label_all(tmp_path):
    # "target" is a label column name, but here it is the target, never the label; the input
    # column is detected as the one column left.
    rows = [{"source": f"long text {i}", "target": f"short {i}"} for i in range(30)]
    cfg = DataConfig(source=str(write_rows(tmp_path / "d.csv", rows)), target_column="target")
    splits = load_splits(cfg)
    assert splits.label_names == ["all"]
    assert (len(splits.train), len(splits.test)) == (24, 6)
    assert Counter(all_rows(splits)) == Counter((r["source"], r["target"], "all") for r in rows)
    parts = [load_partition(cfg, i, 4) for i in range(4)]  # iid partitions work
    assert sum(len(p) for p in parts) == 24
    for partitioner in ("dirichlet", "pathological"):
        with pytest.raises(ConfigError) as info:
            load_partition(replace(cfg, partitioner=partitioner), 0, 4)
        assert info.value.key == "data.partitioner" and "'all'" in str(info.value)
        # refused already where the run is planned, before any client trains
        error = error_of(replace(cfg, partitioner=partitioner))
        assert error.key == "data.partitioner" and "'all'" in str(error)


def test_rows_with_empty_targets_are_dropped(tmp_path):
    rows = pair_rows(40)
    for i, empty in ((3, ""), (7, "   "), (11, None)):
        rows[i]["summary"] = empty
    cfg = DataConfig(
        source=str(write_rows(tmp_path / "d.jsonl", rows)),
        input_column="doc",
        target_column="summary",
    )
    kept = all_rows(load_splits(cfg))
    assert len(kept) == 37
    assert {text for text, _, _ in kept} == {r["doc"] for r in rows if (r["summary"] or "").strip()}


def test_identical_inputs_land_in_the_same_split(tmp_path):
    rows = [{"doc": f"doc {i % 25}", "summary": f"sum {i}"} for i in range(100)]
    cfg = DataConfig(
        source=str(write_rows(tmp_path / "d.csv", rows)),
        input_column="doc",
        target_column="summary",
        server_examples=8,
    )
    splits = load_splits(cfg)
    assert len(all_rows(splits)) == 100
    inputs = [set(s["text"]) for s in (splits.train, splits.test, splits.server)]
    assert not inputs[0] & inputs[1] and not inputs[0] & inputs[2] and not inputs[1] & inputs[2]


def test_run_config_keys():
    settings, _ = parse_run_config({"data.input-column": "doc", "data.target-column": "summary"})
    assert settings.data == DataConfig(input_column="doc", target_column="summary")
    assert settings.data.pairs and not DataConfig().pairs


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("columns", "key", "value"),
    [
        ({"input_column": "nope", "target_column": "summary"}, "data.input-column", "nope"),
        ({"input_column": "doc+nope", "target_column": "summary"}, "data.input-column", "doc+nope"),
        ({"input_column": "doc", "target_column": "nope"}, "data.target-column", "nope"),
    ],
)
def test_missing_columns_name_the_key_and_the_columns(tmp_path, columns, key, value):
    source = write_rows(tmp_path / "d.csv", pair_rows(20))
    error = error_of(DataConfig(source=str(source), **columns))
    assert (error.key, error.value) == (key, value)
    assert "['doc', 'summary', 'topic']" in str(error)


@pytest.mark.parametrize(
    ("source", "field", "key"),
    [
        ("bbc-news", "target_column", "data.target-column"),
        ("bbc-news", "text_column", "data.text-column"),
        ("bbc-news", "label_column", "data.label-column"),
        ("bbc-news-headlines", "input_column", "data.input-column"),
        ("bbc-news-headlines", "label_column", "data.label-column"),
    ],
)
def test_class_folders_have_no_columns(source, field, key):
    """Files in class folders have no columns: a column key is refused, never ignored."""
    error = error_of(DataConfig(source=source, **{field: "title"}))
    assert (error.key, error.value) == (key, "title")


def test_undetectable_input_column_names_input_column(tmp_path):
    rows = [{"a": f"a{i}", "b": f"b{i}", "summary": f"s{i}"} for i in range(20)]
    source = write_rows(tmp_path / "d.csv", rows)
    error = error_of(DataConfig(source=str(source), target_column="summary"))
    assert error.key == "data.input-column" and "['a', 'b', 'summary']" in str(error)


def test_an_all_empty_target_column_is_refused(tmp_path):
    rows = [{**row, "summary": " "} for row in pair_rows(20)]
    source = write_rows(tmp_path / "d.csv", rows)
    error = error_of(DataConfig(source=str(source), input_column="doc", target_column="summary"))
    assert (error.key, error.value) == ("data.target-column", "summary")
    assert "empty in every row" in str(error)


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"text_column": "doc", "input_column": "doc", "target_column": "s"}, "data.input-column"),
        ({"text_column": "doc", "input_column": "doc"}, "data.input-column"),
        ({"input_column": "doc"}, "data.input-column"),
        ({"text_column": "doc", "target_column": "s"}, "data.text-column"),
        ({"source": "bbc-news-headlines", "target_column": "s"}, "data.target-column"),
        ({"target_column": 3}, "data.target-column"),
        ({"input_column": None, "target_column": "s"}, "data.input-column"),
    ],
)
def test_conflicting_column_keys_are_refused(fields, key):
    with pytest.raises(ConfigError) as info:
        DataConfig(**fields)
    assert info.value.key == key and key in str(info.value)


# ---------------------------------------------------------------------------- built-in sources


def article_pairs() -> Counter[tuple[str, str, str]]:
    """(body, title, category) of every packaged BBC News article, read independently."""
    pairs: Counter[tuple[str, str, str]] = Counter()
    for path in bbc_news_folder().glob("*/*.txt"):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # sports/199.txt is Windows-1252
            text = raw.decode("cp1252")
        lines = text.splitlines()
        first = next(i for i, line in enumerate(lines) if line.strip())
        body = "\n".join(lines[first + 1 :]).strip()
        pairs[(body, lines[first].strip(), path.parent.name)] += 1
    return pairs


def test_bbc_news_headlines_titles_are_targets():
    splits = load_splits(DataConfig(source="bbc-news-headlines", server_examples=25))
    assert splits.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    for split in (splits.train, splits.test, splits.server):
        assert split is not None and split.column_names == ["text", "label", "target"]
        assert set(split["label"]) == set(range(5))
    rows = all_rows(splits)
    assert len(rows) == 2225  # every article has a title
    assert Counter(rows) == article_pairs()
    assert all(target and "\n" not in target and target not in text for text, target, _ in rows)
    ad_sales = [text for text, target, _ in rows if target == "Ad sales boost Time Warner profit"]
    assert len(ad_sales) == 1 and ad_sales[0].startswith("Quarterly profits at US media giant")


def test_agnews_title_from_description(shared_data):
    source = shared_data / "agnews" / "test.csv"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    cfg = DataConfig(source=str(source), input_column="description", target_column="title")
    splits = load_splits(cfg)
    assert splits.label_names == ["1", "2", "3", "4"]
    assert (len(splits.train), len(splits.test)) == (6080, 1520)
    rows = all_rows(splits)
    pension = [
        (text, label)
        for text, target, label in rows
        if target == "Fears for T N pension after talks"
    ]
    assert len(pension) == 1
    assert (
        pension[0][0].startswith("Unions representing workers at Turner") and pension[0][1] == "3"
    )
    assert all(text and target for text, target, _ in rows)
