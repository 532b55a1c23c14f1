"""The ``data.*`` run-config section: where the data comes from and how it is split.

Checked when a run is configured, before anything is read (:mod:`hetfed.data_sources` reads a
source, :mod:`hetfed.data` splits and partitions it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from hetfed.errors import ConfigError

BBC_NEWS = "bbc-news"
BBC_NEWS_HEADLINES = "bbc-news-headlines"  # BBC News as (article, title) pairs
SOURCE_ALLOWED = (
    "'bbc-news', 'bbc-news-headlines', an existing folder/file (csv, tsv, jsonl), "
    "or a Hugging Face Hub dataset name"
)
PARTITIONERS = ("iid", "dirichlet", "pathological")
# the parts of a client's partition (what it trains on and holds out) and of the central data
TRAIN, VALIDATION, TEST = "train", "validation", "test"


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
    # each client's own test split, held out of its partition (federated evaluation): 0 = none
    local_test_fraction: float = 0.0
    # each client's own validation split, held out beside it (federated evaluation reads it every
    # round, the local test split then only in the last test-rounds rounds): 0 = none
    local_validation_fraction: float = 0.0
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
        if not is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
            raise bad("dirichlet_alpha", "a finite number > 0 (smaller = more label skew)")
        if not is_int(self.classes_per_partition) or self.classes_per_partition < 1:
            raise bad("classes_per_partition", "an integer >= 1")
        fraction = self.test_fraction
        if not is_number(fraction) or not 0 < fraction < 1:
            raise bad("test_fraction", "a number strictly between 0 and 1")
        if not is_int(self.server_examples) or self.server_examples < 0:
            raise bad("server_examples", "an integer >= 0 (0 = no server split)")
        if not is_int(self.validation_examples) or self.validation_examples < 0:
            raise bad("validation_examples", "an integer >= 0 (0 = no validation split)")
        if not is_int(self.max_test_examples) or self.max_test_examples < 0:
            raise bad("max_test_examples", "an integer >= 0 (0 = the whole test split)")
        local = self.local_test_fraction
        if not is_number(local) or not 0 <= local < 1:
            raise bad("local_test_fraction", "a number in [0, 1) (0 = no local test split)")
        held_out = self.local_validation_fraction
        if not is_number(held_out) or not 0 <= held_out < 1 - local:
            raise bad(
                "local_validation_fraction",
                f"a number in [0, {1 - local:g}): with data.local-test-fraction {local:g}, "
                "a client keeps some examples to train on (0 = no local validation split)",
            )
        if not is_int(self.seed) or self.seed < 0:
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


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
