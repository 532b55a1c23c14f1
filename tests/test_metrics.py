"""Metrics declared once (hetfed/metrics.py): what logs, summaries and sweeps read from them."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from hetfed.generation import Evaluation
from hetfed.metrics import (
    ACCURACY,
    BY_TARGET_KEY,
    METRICS,
    PERPLEXITY,
    ROUGE_L,
    describe,
    final_and_best,
    quality,
)
from hetfed.results import RoundRecord


def test_every_metric_is_an_evaluation_and_a_round_record_field():
    for fields in (dataclasses.fields(Evaluation), dataclasses.fields(RoundRecord)):
        names = {f.name for f in fields}
        assert {m.key for m in METRICS} <= names


def test_targets_have_a_key_a_range_and_a_direction():
    assert set(BY_TARGET_KEY) == {"target-accuracy", "target-rouge-l", "target-perplexity"}
    assert ACCURACY.valid_target(1.0) and not ACCURACY.valid_target(0.0)
    assert not ACCURACY.valid_target(True) and not ROUGE_L.valid_target(1.5)
    assert PERPLEXITY.valid_target(1.0) and not PERPLEXITY.valid_target(0.5)
    assert PERPLEXITY.target_allowed() == "a number >= 1"
    assert ROUGE_L.target_allowed() == "a number in (0, 1]"
    assert ACCURACY.reached(0.6, 0.6) and not ACCURACY.reached(0.59, 0.6)
    assert PERPLEXITY.reached(3.9, 4) and not PERPLEXITY.reached(4.1, 4)
    assert not ACCURACY.reached(None, 0.1)
    assert PERPLEXITY.best_of({0.1: 9.0, 0.2: 3.0, 0.3: 3.0}) == 0.2  # lower, first of equals
    assert quality(generation=False) == (ACCURACY,) and quality(generation=True)[0] is ROUGE_L


def _round(number, accuracy, loss, rouge_l=None, perplexity=None):
    return SimpleNamespace(
        round=number, accuracy=accuracy, loss=loss, rouge_l=rouge_l, perplexity=perplexity
    )


def test_final_and_best_read_each_metric_in_its_direction():
    rounds = [
        _round(0, 0.1, 3.0, 0.0, 20.0),
        _round(1, 0.5, 2.0, 0.3, 7.4),
        _round(2, 0.5, 2.5, 0.2, 12.2),
    ]
    final = Evaluation(accuracy=0.45, loss=2.4, rouge_l=0.25, perplexity=11.0)
    figures = final_and_best(final, rounds)
    assert figures == {
        "final_accuracy": 0.45,
        "best_accuracy": 0.5,
        "final_loss": 2.4,
        "best_loss": 2.0,
        "final_rouge_l": 0.25,
        "best_rouge_l": 0.3,
        "final_perplexity": 11.0,
        "best_perplexity": 7.4,
        "best_round": 1,  # the first of the equal best accuracies
    }
    classification = final_and_best(Evaluation(accuracy=0.4, loss=1.0), rounds[:2])
    assert classification["final_rouge_l"] is None and classification["best_accuracy"] == 0.5


def test_a_round_is_described_by_the_figures_it_has():
    assert describe(_round(1, 0.91234, 0.31416)) == "accuracy 0.9123  loss 0.3142"
    line = describe(_round(1, 0.0, 2.0, 0.25, 7.389))
    assert line == "accuracy 0.0000  loss 2.0000  ROUGE-L 0.2500  perplexity 7.3890"


@pytest.mark.parametrize("metric", METRICS)
def test_a_target_key_names_its_metric(metric):
    if metric.target_key is not None:
        assert BY_TARGET_KEY[metric.target_key] is metric
        assert metric.target_key == "target-" + metric.key.replace("_", "-")
