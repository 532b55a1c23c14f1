"""The figures a run is judged by, each declared once.

A :class:`Metric` says what a figure is called (its key in ``metrics.jsonl``, in
:class:`~hetfed.generation.Evaluation` and, as ``final_<key>`` and ``best_<key>``, in
``summary.json``), whether higher is better, how it is printed and plotted, which targets a sweep
may set on it (``target-<key>``), and which per-example field of ``test_examples.jsonl`` a paired
bootstrap resamples. Logs, plots, summaries and sweep tables read these declarations; what
computes a figure is named in its ``computed_by``. Adding a figure: declare it here, compute it
in :mod:`hetfed.generation` (an ``Evaluation`` field), and give ``RoundRecord`` its field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hetfed.data_config import VALIDATION


@dataclass(frozen=True)
class Metric:
    key: str
    short: str  # in the round log and table headers
    label: str  # on plot axes
    higher_is_better: bool
    computed_by: str
    generation_only: bool = False  # only the generation task reports it
    target_low: float | None = None  # a sweep target is in (low, high]; None: no target
    target_high: float = math.inf
    per_example: str | None = None  # the test_examples.jsonl field a bootstrap resamples

    @property
    def in_unit_interval(self) -> bool:
        """A share in [0, 1] (accuracy, ROUGE-L): such figures share a plot axis."""
        return self.target_low == 0.0 and self.target_high == 1.0

    @property
    def target_key(self) -> str | None:
        """The sweep file's key of a target on this metric (None: it takes none)."""
        return None if self.target_low is None else "target-" + self.key.replace("_", "-")

    def target_allowed(self) -> str:
        """The values a target may take, in words."""
        if self.target_high == math.inf:
            return f"a number >= {self.target_low:g}"
        return f"a number in ({self.target_low:g}, {self.target_high:g}]"

    def valid_target(self, value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        if self.target_high == math.inf:
            return value >= self.target_low
        return self.target_low < value <= self.target_high

    def reached(self, value: float | None, target: float) -> bool:
        """Whether ``value`` reaches ``target`` in this metric's direction."""
        if value is None:
            return False
        return value >= target if self.higher_is_better else value <= target

    def best(self, values: list[float]) -> float | None:
        """The best of ``values`` (None: there are none)."""
        return (max if self.higher_is_better else min)(values, default=None)

    def best_of(self, scores: dict) -> object:
        """The key of ``scores`` whose value is best (the first of equals)."""
        return (max if self.higher_is_better else min)(scores, key=scores.get)


ACCURACY = Metric(
    "accuracy",
    "accuracy",
    "accuracy",
    True,
    "hetfed.training.score: the share of examples whose prediction (the argmax class, or every "
    "answer token for the causal tasks) is right",
    target_low=0.0,
    target_high=1.0,
    per_example="correct",
)
LOSS = Metric(
    "loss",
    "loss",
    "loss",
    False,
    "hetfed.training.score: cross-entropy per target (class or answer token)",
)
ROUGE_L = Metric(
    "rouge_l",
    "ROUGE-L",
    "ROUGE-L F1 of greedy generations",
    True,
    "hetfed.generation.rouge_l_scores: the rouge-score package, stemmed, per generation",
    generation_only=True,
    target_low=0.0,
    target_high=1.0,
    per_example="rouge_l",
)
PERPLEXITY = Metric(
    "perplexity",
    "perplexity",
    "perplexity of the references",
    False,
    "hetfed.generation.evaluate: exp(loss per reference target token)",
    generation_only=True,
    target_low=1.0,
)
METRICS = (ACCURACY, LOSS, ROUGE_L, PERPLEXITY)
BY_TARGET_KEY = {m.target_key: m for m in METRICS if m.target_key is not None}


def quality(generation: bool) -> tuple[Metric, ...]:
    """The figures a run's quality is compared on: accuracy, or for the generation task (whose
    exact match of free-form text is ~0) ROUGE-L and perplexity."""
    return (ROUGE_L, PERPLEXITY) if generation else (ACCURACY,)


def figures_of(source: object) -> dict[Metric, float]:
    """The figures ``source`` (an Evaluation or a RoundRecord) has, in :data:`METRICS` order."""
    values = {m: getattr(source, m.key) for m in METRICS}
    return {m: v for m, v in values.items() if v is not None}


def describe(source: object) -> str:
    """The figures of ``source`` for a log line: ``accuracy 0.9123  loss 0.3141``."""
    return "  ".join(f"{m.short} {v:.4f}" for m, v in figures_of(source).items())


def final_and_best(final: object, rounds: list) -> dict[str, float | int | None]:
    """``final_<key>`` of the final model's evaluation, ``best_<key>`` over the rounds' records
    (in each metric's direction) and ``best_round``, the round of the best accuracy (the first of
    equals): summary.json's figures."""
    figures: dict[str, float | int | None] = {}
    for metric in METRICS:
        values = [v for r in rounds if (v := getattr(r, metric.key)) is not None]
        figures[f"final_{metric.key}"] = getattr(final, metric.key)
        figures[f"best_{metric.key}"] = metric.best(values)
    best = max(rounds, key=lambda r: r.accuracy)
    figures["best_round"] = best.round
    return figures


# a federated evaluation's figures: the mean, the worst 10% and the spread of client accuracies
# on the round's client split, and (CLIENT_TEST_FIGURES) on the local test splits where that
# split is validation
CLIENT_FIGURES = ("client_accuracy_mean", "client_accuracy_worst10", "client_accuracy_spread")
CLIENT_TEST_FIGURES = tuple(key.replace("client_", "client_test_") for key in CLIENT_FIGURES)


def final_client_figures(final: Any) -> dict[str, float | None]:
    """``final_client_accuracy_mean``/``_worst10``/``_spread`` of summary.json: the final
    round's federated evaluation (a :class:`hetfed.results.RoundRecord`) on the clients' test
    splits, read from its test figures where its client split is validation."""
    on_test = final.client_split == VALIDATION
    names = CLIENT_TEST_FIGURES if on_test else CLIENT_FIGURES
    return {
        f"final_{key}": getattr(final, name)
        for key, name in zip(CLIENT_FIGURES, names, strict=True)
    }


def client_distribution(
    accuracies: list[float], names: tuple[str, ...] = CLIENT_FIGURES
) -> dict[str, float | None]:
    """The spread of the clients' accuracies in a federated evaluation (one per client, on its
    own held-out split): their mean (each client counts once), the mean of the worst 10% (the
    ceil(K / 10) lowest) and the spread, the standard deviation over clients (ddof 0), under
    ``names``. None without clients."""
    if not accuracies:
        return dict.fromkeys(names)
    ordered = sorted(accuracies)
    worst = ordered[: math.ceil(len(ordered) / 10)]
    mean = sum(ordered) / len(ordered)
    spread = math.sqrt(sum((a - mean) ** 2 for a in ordered) / len(ordered))
    return dict(zip(names, (mean, sum(worst) / len(worst), spread), strict=True))
