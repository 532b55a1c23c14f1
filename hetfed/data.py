"""Text data for hetfed: read a source, encode its labels, cut its splits, partition it.

A *source* (``data.source``) is read by its reader (:mod:`hetfed.data_sources`: the packaged
BBC News, a local file or folder, a Hugging Face Hub dataset). Every split comes out with the
columns ``text`` (str) and ``label`` (a ``ClassLabel`` whose ints run 0..K-1, named by
``label_names``). A *pair source* (``data.target-column`` names the target
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

import functools
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from hetfed import seeds
from hetfed.data_config import SOURCE_ALLOWED, TEST, TRAIN, VALIDATION, DataConfig, is_int
from hetfed.data_sources import INT_LABEL, RawSource, Rows, read_source
from hetfed.errors import ConfigError
from hetfed.seeds import Stream

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------
# Labels and splitting
# --------------------------------------------------------------------------------------------


def _encode_labels(raw: RawSource) -> tuple[list[str], Rows, Rows | None]:
    """Label names, and the train and test rows with int labels indexing them: known names keep
    their ints; int-like labels keep their order (remapped to 0..K-1); other labels are sorted
    names."""
    test_labels = raw.test.labels if raw.test is not None else []
    values = {str(v).strip() for v in [*raw.train.labels, *test_labels]}
    if raw.label_names is not None:
        names = list(raw.label_names)

        def index(v: Any) -> int:
            return int(v)
    elif values and all(INT_LABEL.match(v) for v in values):
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

    def encoded(rows: Rows) -> Rows:
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


def _drop_empty(rows: Rows, where: str) -> Rows:
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


def _dataset(rows: Rows, names: list[str]) -> datasets.Dataset:
    """Columns text and label, and target for a pair source."""
    columns: dict[str, list[Any]] = {"text": rows.texts, "label": rows.labels}
    features = {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    if rows.targets is not None:
        columns["target"] = rows.targets
        features["target"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _held_out(
    train: Rows, test: Rows, cfg: DataConfig, field: str, stream: Stream
) -> tuple[Rows | None, Rows]:
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
    raw = read_source(cfg)
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

    def build(rows: Rows, stream: int) -> datasets.Dataset:
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
    if not is_int(num_partitions) or num_partitions < 1:
        raise ConfigError("num-partitions", num_partitions, "an integer >= 1", "node config")
    if not is_int(partition_id) or not 0 <= partition_id < num_partitions:
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


def local_split(
    partition: datasets.Dataset, cfg: DataConfig, partition_id: int
) -> dict[str, datasets.Dataset]:
    """A client's partition by part: its local test split, a random ``data.local-test-fraction``
    of it held out for federated evaluation, its local validation split, the next
    ``data.local-validation-fraction`` of the same draw (only when that is > 0), and the rest
    to train on (at least one example each; one draw from the partition's own stream of
    :mod:`hetfed.seeds`, so the parts are disjoint and the test split does not depend on
    whether a validation split is held out)."""
    n, validation = len(partition), cfg.local_validation_fraction
    n_test = min(max(1, round(cfg.local_test_fraction * n)), n - 1)
    n_validation = min(max(1, round(validation * n)), n - 1 - n_test) if validation > 0 else 0
    if cfg.local_test_fraction <= 0 or n < 2 or (validation > 0 and n_validation < 1):
        raise ValueError(
            f"cannot hold out local splits of partition {partition_id} ({n} examples, "
            f"data.local-test-fraction {cfg.local_test_fraction}, "
            f"data.local-validation-fraction {cfg.local_validation_fraction}): it needs an "
            "example for each held-out split and one to train on"
        )
    order = seeds.rng(cfg.seed, Stream.LOCAL_SPLITS, partition_id).permutation(n)
    held = n_test + n_validation
    parts = {TEST: order[:n_test], VALIDATION: order[n_test:held], TRAIN: order[held:]}
    return {name: partition.select(sorted(rows)) for name, rows in parts.items() if len(rows)}
