"""Tests of hetfed.data: sources, splits, partitions and bad input."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import datasets
import pytest

from hetfed import data
from hetfed.data import clear_cache, load_partition, load_splits
from hetfed.data_config import DataConfig
from hetfed.data_sources import resolve_source
from hetfed.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(name: str) -> Path:
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is absent")
    return folder


def label_entropy(labels: list[int]) -> float:
    counts = Counter(labels)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def partitions(cfg: DataConfig, n: int) -> list[datasets.Dataset]:
    return [load_partition(cfg, i, n) for i in range(n)]


def assert_exact_cover(parts: list[datasets.Dataset], train: datasets.Dataset) -> None:
    assert sum(len(p) for p in parts) == len(train)
    together = Counter((t, y) for p in parts for t, y in zip(p["text"], p["label"], strict=True))
    assert together == Counter(zip(train["text"], train["label"], strict=True))


@pytest.fixture(scope="module")
def bbc() -> data.DataSplits:
    return load_splits(DataConfig(server_examples=50))


# ---------------------------------------------------------------------------- sources


def test_bbc_news_loads_with_disjoint_splits(bbc):
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert bbc.server is not None and len(bbc.server) == 50
    total = len(bbc.train) + len(bbc.test) + len(bbc.server)
    assert total == 2225
    assert 0.18 <= len(bbc.test) / total <= 0.22
    for split in (bbc.train, bbc.test, bbc.server):
        assert split.column_names == ["text", "label"]
        assert set(split["label"]) == set(range(5))  # stratified: every class everywhere
        assert all(isinstance(t, str) and t for t in split["text"])
    train, test, server = (set(s["text"]) for s in (bbc.train, bbc.test, bbc.server))
    assert not train & test and not train & server and not test & server


def test_bbc_news_reads_the_file_that_is_not_utf8(bbc):
    texts = [t for s in (bbc.train, bbc.test, bbc.server) for t in s["text"]]
    assert any("\u00a315.8m" in t for t in texts)  # sports/199.txt is Windows-1252 ("£")
    assert not any("\ufffd" in t for t in texts)


def test_server_split_leaves_test_alone():
    plain = load_splits(DataConfig())
    with_server = load_splits(DataConfig(server_examples=50))
    assert plain.server is None
    assert list(plain.test["text"]) == list(with_server.test["text"])
    assert len(plain.train) == len(with_server.train) + 50


def test_validation_split_comes_from_train_and_never_overlaps_test_or_server():
    """data.validation-examples: held out from the training data (stratified, seeded), after
    the server split; the test split is exactly as without it."""
    plain = load_splits(DataConfig(server_examples=50))
    splits = load_splits(DataConfig(server_examples=50, validation_examples=100))
    assert plain.validation is None and len(splits.validation) == 100
    assert list(plain.test["text"]) == list(splits.test["text"])
    assert list(plain.server["text"]) == list(splits.server["text"])
    assert len(plain.train) == len(splits.train) + 100
    validation = set(splits.validation["text"])
    assert validation <= set(plain.train["text"])
    for other in (splits.train, splits.test, splits.server):
        assert not validation & set(other["text"])
    assert set(splits.validation["label"]) == set(range(5))  # stratified: every class
    again = load_splits(DataConfig(server_examples=50, validation_examples=100, seed=43))
    assert set(again.validation["text"]) != validation  # another seed, another split


def test_max_test_examples_takes_a_stratified_subset():
    splits = load_splits(DataConfig(max_test_examples=100))
    assert len(splits.test) == 100
    counts = Counter(splits.test["label"])
    assert set(counts) == set(range(5)) and max(counts.values()) <= 25
    assert set(splits.test["text"]) <= set(load_splits(DataConfig()).test["text"])


def test_banking77_keeps_its_own_splits():
    splits = load_splits(DataConfig(source=str(shared("banking77"))))
    assert (len(splits.train), len(splits.test)) == (10003, 3080)
    assert len(splits.label_names) == 77 and "card_arrival" in splits.label_names
    assert splits.label_names == sorted(splits.label_names)


def test_agnews_headerless_test_csv_is_split():
    folder = shared("agnews")
    splits = load_splits(DataConfig(source=str(folder)))
    assert splits.label_names == ["1", "2", "3", "4"]
    assert len(splits.train) + len(splits.test) == 7600
    assert len(splits.test) == 1520
    assert set(splits.train["label"]) == {0, 1, 2, 3}
    first = "Fears for T N pension after talks. Unions representing workers at Turner"
    rows = [
        (t, y)
        for s in (splits.train, splits.test)
        for t, y in zip(s["text"], s["label"], strict=True)
    ]
    assert [y for t, y in rows if t.startswith(first)] == [2]  # label "3" -> 2
    # The file itself works as a source too, with the same result.
    single = load_splits(DataConfig(source=str(folder / "test.csv")))
    assert list(single.test["text"]) == list(splits.test["text"])


def test_sst2_dev_file_with_another_text_column():
    splits = load_splits(DataConfig(source=str(shared("sst2"))))
    assert (len(splits.train), len(splits.test)) == (67349, 872)  # dev.tsv has "content"
    assert splits.label_names == ["0", "1"]


def test_local_jsonl_with_string_labels(tmp_path):
    rows = [{"sentence": f"item {i}", "intent": ["zeta", "alpha", "mid"][i % 3]} for i in range(30)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:24]) + "\n")
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[24:]))
    splits = load_splits(DataConfig(source=str(tmp_path)))
    assert splits.label_names == ["alpha", "mid", "zeta"]
    assert (len(splits.train), len(splits.test)) == (24, 6)
    expected = {r["sentence"]: splits.label_names.index(r["intent"]) for r in rows}
    for split in (splits.train, splits.test):
        for text, label in zip(split["text"], split["label"], strict=True):
            assert expected[text] == label


def test_local_csv_int_labels_remapped_and_cp1252_read(tmp_path):
    lines = ["review,target"] + [f"caf\u00e9 \u00a3{i},{[3, 9, 7][i % 3]}" for i in range(40)]
    (tmp_path / "reviews.csv").write_bytes("\n".join(lines).encode("cp1252"))
    splits = load_splits(DataConfig(source=str(tmp_path / "reviews.csv"), test_fraction=0.25))
    assert splits.label_names == ["3", "7", "9"]
    assert (len(splits.train), len(splits.test)) == (30, 10)
    for split in (splits.train, splits.test):
        for text, label in zip(split["text"], split["label"], strict=True):
            i = int(text.split("\u00a3")[1])
            assert text.startswith("caf\u00e9") and label == {3: 0, 7: 1, 9: 2}[[3, 9, 7][i % 3]]


def test_explicit_columns_join_and_unknown_column(tmp_path):
    lines = ["head,body,y"] + [f"h{i},b{i},{'ab'[i % 2]}" for i in range(20)]
    (tmp_path / "d.csv").write_text("\n".join(lines))
    cfg = DataConfig(source=str(tmp_path / "d.csv"), text_column="head+body", label_column="y")
    splits = load_splits(cfg)
    assert all(t.startswith("h") and ". b" in t for t in splits.train["text"])
    with pytest.raises(ConfigError, match="data.text-column.*'nope'"):
        load_splits(
            DataConfig(source=str(tmp_path / "d.csv"), text_column="nope", label_column="y")
        )
    with pytest.raises(ConfigError, match="data.label-column.*'head', 'body', 'y'"):
        load_splits(DataConfig(source=str(tmp_path / "d.csv"), text_column="head"))


def test_hub_failure_is_a_clear_config_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/news' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert resolve_source("someone/news") == "someone/news"
    with pytest.raises(ConfigError) as info:
        load_splits(DataConfig(source="someone/news"))
    message = str(info.value)
    assert "data.source" in message and "'someone/news'" in message
    assert "Hub download failed: ConnectionError: Couldn't reach" in message


def test_hub_dataset_uses_classlabel_names_and_a_labelled_test_split(monkeypatch):
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def split(prefix: str, n: int, labelled: bool = True) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "sentence": [f"{prefix} {i}" for i in range(n)],
                "label": [i % 2 if labelled else -1 for i in range(n)],
            },
            features=features,
        )

    calls = []

    def fake(name, config=None):
        calls.append((name, config))
        return datasets.DatasetDict(
            {"train": split("tr", 40), "validation": split("va", 10), "test": split("te", 8, False)}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    splits = load_splits(DataConfig(source="nyu-mll/glue:sst2"))
    assert calls == [("nyu-mll/glue", "sst2")]
    assert splits.label_names == ["neg", "pos"]
    assert (len(splits.train), len(splits.test)) == (40, 10)
    assert all(t.startswith("va") for t in splits.test["text"])  # unlabelled test skipped


# ---------------------------------------------------------------------------- partitions


def test_iid_partitions_cover_train_exactly_once(bbc):
    cfg = DataConfig(server_examples=50)
    parts = partitions(cfg, 10)
    assert_exact_cover(parts, bbc.train)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_dirichlet_is_more_skewed_than_iid(bbc):
    iid = partitions(DataConfig(), 10)
    skewed = partitions(DataConfig(partitioner="dirichlet", dirichlet_alpha=0.1), 10)
    assert_exact_cover(skewed, load_splits(DataConfig()).train)
    mean_iid = sum(label_entropy(p["label"]) for p in iid) / 10
    mean_skewed = sum(label_entropy(p["label"]) for p in skewed) / 10
    assert mean_iid > 0.95 * math.log(5)
    assert mean_skewed < 0.6 * mean_iid


def test_dirichlet_many_partitions_small_alpha_leaves_none_empty():
    cfg = DataConfig(partitioner="dirichlet", dirichlet_alpha=0.1)
    parts = partitions(cfg, 20)
    assert all(len(p) > 0 for p in parts)
    assert_exact_cover(parts, load_splits(cfg).train)


def test_pathological_partitions_hold_at_most_two_labels():
    cfg = DataConfig(partitioner="pathological", classes_per_partition=2)
    parts = partitions(cfg, 10)
    assert all(0 < len(set(p["label"])) <= 2 for p in parts)
    assert len({y for p in parts for y in p["label"]}) == 5  # first-deterministic uses all


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_same_config_gives_identical_partitions(partitioner):
    cfg = DataConfig(partitioner=partitioner, server_examples=20)
    clear_cache()
    first = [list(p["text"]) for p in partitions(cfg, 5)]
    clear_cache()
    again_cfg = DataConfig(partitioner=partitioner, server_examples=20)
    again = [list(p["text"]) for p in partitions(again_cfg, 5)]
    assert first == again
    other = [list(p["text"]) for p in partitions(DataConfig(partitioner=partitioner, seed=7), 5)]
    assert other != first


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("partitioner", "kmeans"),
        ("dirichlet_alpha", 0.0),
        ("dirichlet_alpha", -1.0),
        ("dirichlet_alpha", float("nan")),
        ("test_fraction", 0.0),
        ("test_fraction", 1.0),
        ("test_fraction", 1.5),
        ("classes_per_partition", 0),
        ("server_examples", -1),
        ("max_test_examples", -5),
        ("seed", -1),
        ("source", ""),
    ],
)
def test_bad_config_values_are_rejected(field, value):
    with pytest.raises(ConfigError) as info:
        DataConfig(**{field: value})
    key = f"data.{field.replace('_', '-')}"
    assert info.value.key == key
    assert key in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("missing", ["/no/such/folder/banking77", "./no-such-file.csv"])
def test_missing_local_path_is_rejected_early(missing):
    with pytest.raises(ConfigError) as info:
        resolve_source(missing)
    assert "data.source" in str(info.value) and repr(missing) in str(info.value)
    assert "Hugging Face Hub dataset name" in str(info.value)
    with pytest.raises(ConfigError, match="data.source"):
        load_splits(DataConfig(source=missing))


def test_folder_without_data_is_rejected(tmp_path):
    (tmp_path / "notes.md").write_text("nothing here")
    with pytest.raises(ConfigError, match="data.source"):
        resolve_source(str(tmp_path))


def test_resolve_source_kinds():
    bbc_folder = resolve_source("bbc-news")
    assert isinstance(bbc_folder, Path) and (bbc_folder / "tech").is_dir()
    assert resolve_source("fancyzhx/ag_news") == "fancyzhx/ag_news"


@pytest.mark.parametrize(("partition_id", "num_partitions"), [(10, 10), (-1, 10), (3, 3)])
def test_partition_id_out_of_range(partition_id, num_partitions):
    with pytest.raises(ConfigError) as info:
        load_partition(DataConfig(), partition_id, num_partitions)
    assert "partition-id" in str(info.value) and repr(partition_id) in str(info.value)


def test_bad_partition_counts():
    with pytest.raises(ConfigError, match="num-partitions"):
        load_partition(DataConfig(), 0, 0)
    with pytest.raises(ConfigError, match="num-partitions.*100000"):
        load_partition(DataConfig(), 0, 100000)
    with pytest.raises(ConfigError, match="data.classes-per-partition.*6"):
        load_partition(DataConfig(partitioner="pathological", classes_per_partition=6), 0, 4)
    with pytest.raises(ConfigError, match="data.server-examples.*5000"):
        load_splits(DataConfig(server_examples=5000))


def test_a_registered_reader_reads_its_own_kind_of_source(monkeypatch):
    """A new kind of source is one small reader: it recognises its sources, reads rows, and
    splitting and partitioning are the same as for every other source."""
    from hetfed import data_sources
    from hetfed.data_sources import RawSource, Rows, SourceReader, find_reader, register_reader

    class Repeated(SourceReader):
        kind = "repeated words"

        def locate(self, source):
            return int(source.removeprefix("repeat:")) if source.startswith("repeat:") else None

        def read(self, location, cfg):
            words = ["alpha", "beta", "gamma"]
            texts = [f"{words[i % 3]} {i}" for i in range(location)]
            return RawSource(Rows(texts, [words[i % 3] for i in range(location)]), None, None)

    monkeypatch.setattr(data_sources, "READERS", list(data_sources.READERS))
    register_reader(Repeated())
    assert isinstance(find_reader("repeat:90")[0], Repeated)
    assert find_reader("bbc-news")[0].kind == "packaged corpus"  # the built-ins still answer
    splits = load_splits(DataConfig(source="repeat:90", test_fraction=0.2))
    assert splits.label_names == ["alpha", "beta", "gamma"]
    assert (len(splits.train), len(splits.test)) == (72, 18)
    assert not set(splits.train["text"]) & set(splits.test["text"])
    with pytest.raises(ConfigError, match="data.source"):
        find_reader("no such source.csv")
