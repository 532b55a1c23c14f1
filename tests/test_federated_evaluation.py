"""Federated evaluation: clients score the global model on their own test splits."""

from __future__ import annotations

import json
import logging
import math

import datasets
import numpy as np
import pytest
from flwr.app import Message, MessageType, RecordDict

from hetfed import adapter_state, wire
from hetfed.config import LoraSettings, RunSettings, parse_run_config
from hetfed.data import local_split
from hetfed.data_config import TEST, TRAIN, VALIDATION, DataConfig
from hetfed.errors import ConfigError
from hetfed.generation import Evaluation
from hetfed.metrics import client_distribution, final_client_figures
from hetfed.results import read_metrics
from strategies.hetlora import HetLoRA, HetLoRAOptions
from tests.conftest import learned_rounds
from tests.harness import PROFILES, InProcessGrid, global_state


def test_the_client_distribution_on_hand_made_accuracies():
    accuracies = [0.9, 0.5, 0.7, 0.8, 0.6, 1.0, 0.4, 0.3, 0.2, 0.95, 0.85]  # 11 clients
    figures = client_distribution(accuracies)
    mean = sum(accuracies) / 11
    assert figures["client_accuracy_mean"] == pytest.approx(mean)
    assert figures["client_accuracy_worst10"] == pytest.approx((0.2 + 0.3) / 2)  # ceil(1.1)
    spread = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / 11)
    assert figures["client_accuracy_spread"] == pytest.approx(spread)
    assert client_distribution([0.5])["client_accuracy_worst10"] == 0.5
    assert set(client_distribution([]).values()) == {None}


def test_a_local_split_holds_out_a_seeded_share_of_the_partition():
    partition = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(40)], "label": [0] * 40}
    )
    cfg = DataConfig(local_test_fraction=0.25, seed=3)
    parts = local_split(partition, cfg, partition_id=5)
    train, test = parts[TRAIN], parts[TEST]
    assert set(parts) == {TRAIN, TEST} and (len(train), len(test)) == (30, 10)
    assert sorted([*train["text"], *test["text"]]) == sorted(partition["text"])
    again = local_split(partition, cfg, partition_id=5)
    assert list(again[TEST]["text"]) == list(test["text"])
    assert list(again[TRAIN]["text"]) == list(train["text"])
    other = local_split(partition, cfg, partition_id=6)
    assert list(other[TEST]["text"]) != list(test["text"])  # each client its own draw


def test_a_local_validation_split_is_held_out_beside_the_test_split():
    """Three disjoint parts that cover the partition; the test part is the one drawn without
    a validation split, so adding one moves examples from training only."""
    partition = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(40)], "label": [0] * 40}
    )
    cfg = DataConfig(local_test_fraction=0.25, local_validation_fraction=0.2, seed=3)
    parts = {name: set(part["text"]) for name, part in local_split(partition, cfg, 5).items()}
    assert [len(parts[name]) for name in (TRAIN, VALIDATION, TEST)] == [22, 8, 10]
    assert parts[TRAIN] | parts[VALIDATION] | parts[TEST] == set(partition["text"])
    assert not parts[VALIDATION] & parts[TEST] and not parts[TRAIN] & (
        parts[VALIDATION] | parts[TEST]
    )
    without = local_split(partition, DataConfig(local_test_fraction=0.25, seed=3), 5)
    assert set(without[TEST]["text"]) == parts[TEST]
    with pytest.raises(ValueError, match="data.local-validation-fraction"):
        local_split(partition.select(range(2)), cfg, 5)  # one test example, none to train on


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"fraction-evaluate": 0.5}, "data.local-test-fraction"),
        ({"data.local-test-fraction": 0.2}, "fraction-evaluate"),
        ({"fraction-evaluate": 1.5, "data.local-test-fraction": 0.2}, "fraction-evaluate"),
        ({"fraction-evaluate": 0.5, "data.local-test-fraction": 1.0}, "data.local-test-fraction"),
        (
            {"data.local-test-fraction": 0.2, "data.local-validation-fraction": 0.2},
            "fraction-evaluate",
        ),
        (
            {
                "fraction-evaluate": 0.5,
                "data.local-test-fraction": 0.5,
                "data.local-validation-fraction": 0.5,
            },
            "data.local-validation-fraction",
        ),
        (
            {"fraction-evaluate": 0.5, "data.local-validation-fraction": 0.2},
            "data.local-test-fraction",
        ),
    ],
)
def test_federated_evaluation_keys_are_checked_together(config, key):
    with pytest.raises(ConfigError) as info:
        parse_run_config(config)
    assert info.value.key == key


def _strategy(validation: float = 0.0) -> HetLoRA:
    settings = RunSettings(
        num_server_rounds=5,
        test_rounds=2,
        min_train_nodes=1,
        min_available_nodes=3,
        lora=LoraSettings(),
        fraction_evaluate=1.0,
        data=DataConfig(local_test_fraction=0.2, local_validation_fraction=validation),
    )
    return HetLoRA(settings, PROFILES, HetLoRAOptions())


def _evaluate_reply(
    msg: Message, accuracy: float, examples: int = 10, test_accuracy: float | None = None
) -> Message:
    test_loss = None if test_accuracy is None else 2.0
    reply = wire.EvaluateReply(examples, accuracy, 1.0, test_accuracy, test_loss)
    return Message(RecordDict({wire.METRICS: reply.to_record()}), reply_to=msg)


def test_every_sampled_client_evaluates_the_global_model_at_its_rank(caplog):
    """Each client is sent the new global adapter as it would train it (its rank, B at its
    scaling); a reply out of range and a reply nobody asked for are logged and left out."""
    strategy = _strategy()
    grid = InProcessGrid(profiles=strategy.profiles)
    state = global_state(np.random.default_rng(0))
    messages = list(strategy.configure_evaluate(4, wire.to_record(state), None, grid))
    assert [m.metadata.message_type for m in messages] == [MessageType.EVALUATE] * 3
    s_g = strategy.global_spec().scaling
    for msg in messages:
        rank = int(msg.content[wire.CONFIG][wire.RANK])
        scaling = float(msg.content[wire.CONFIG][wire.LORA_SCALING])
        sent = wire.from_record(msg.content[wire.ARRAYS])
        truncated = adapter_state.truncate_state(state, rank)
        for key, value in sent.items():
            factor = s_g / scaling if "lora_B" in key else 1.0
            np.testing.assert_allclose(value, truncated[key] * factor, rtol=1e-6)
    assert sorted(int(m.content[wire.CONFIG][wire.RANK]) for m in messages) == [2, 4, 8]
    replies = [_evaluate_reply(messages[0], 0.6), _evaluate_reply(messages[1], 0.9)]
    replies += [_evaluate_reply(messages[2], 1.5)]  # out of range
    replies += [_evaluate_reply(messages[0], 0.1)]  # a second reply of the first node
    with caplog.at_level(logging.WARNING):
        figures = strategy.aggregate_evaluate(4, replies)
    assert strategy.stats[4].client_accuracies == [0.6, 0.9]
    assert figures["client_accuracy_mean"] == pytest.approx(0.75)
    assert "malformed evaluate reply" in caplog.text and "not asked to evaluate" in caplog.text


def test_with_local_validation_the_last_rounds_also_score_the_local_test_splits(caplog):
    """Every round is scored on the clients' validation splits; the last test-rounds (4 and 5
    of 5) on their test splits too. A reply without the round's test figures, or with test
    figures nobody asked for, is left out with its reason."""
    strategy = _strategy(validation=0.2)
    grid = InProcessGrid(profiles=strategy.profiles)
    state = wire.to_record(global_state(np.random.default_rng(0)))
    early = list(strategy.configure_evaluate(3, state, None, grid))
    replies = [_evaluate_reply(early[0], 0.6), _evaluate_reply(early[1], 0.7)]
    replies += [_evaluate_reply(early[2], 0.8, test_accuracy=0.5)]  # unasked
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_evaluate(3, replies)
    assert strategy.stats[3].client_accuracies == [0.6, 0.7]
    assert strategy.stats[3].client_test_accuracies == [] and "unasked" in caplog.text
    last = list(strategy.configure_evaluate(4, state, None, grid))
    replies = [_evaluate_reply(last[0], 0.6, test_accuracy=0.4)]
    replies += [_evaluate_reply(last[1], 0.9, test_accuracy=0.8)]
    replies += [_evaluate_reply(last[2], 0.7)]  # its test figures missing
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_evaluate(4, replies)
    assert "missing" in caplog.text
    stats = strategy.stats[4]
    assert (stats.client_accuracies, stats.client_test_accuracies) == ([0.6, 0.9], [0.4, 0.8])
    record = stats.record(4, Evaluation(0.5, 1.0), VALIDATION, 1.0, 0.0, None, VALIDATION)
    assert record.client_split == VALIDATION
    assert record.client_accuracy_mean == pytest.approx(0.75)
    assert record.client_test_accuracy_mean == pytest.approx(0.6)
    assert record.client_test_accuracy_worst10 == 0.4
    summary = final_client_figures(record)
    assert summary["final_client_accuracy_mean"] == pytest.approx(0.6)  # on test


def test_without_fraction_evaluate_no_client_is_asked():
    strategy = HetLoRA(RunSettings(min_available_nodes=3), PROFILES, HetLoRAOptions())
    grid = InProcessGrid(profiles=strategy.profiles)
    state = wire.to_record(global_state(np.random.default_rng(0)))
    assert list(strategy.configure_evaluate(1, state, None, grid)) == []


@pytest.mark.slow
def test_a_run_evaluates_on_the_clients_own_held_out_splits(run_scenario, tiny_config):
    """Through flwr run: every round after the first, all four clients score the global model
    on their own validation split, and in the last two rounds on their own test split too; the
    distributions land in metrics.jsonl, the final test figures in summary.json."""
    config = {
        **tiny_config,
        "fraction-evaluate": 1.0,
        "data.local-test-fraction": 0.25,
        "data.local-validation-fraction": 0.2,
        "test-rounds": 2,
    }
    proc, results = run_scenario(config)
    rounds = learned_rounds(proc, results)
    assert rounds[0]["client_accuracies"] is None  # round 0: the central evaluation only
    for record in rounds[1:]:
        accuracies = record["client_accuracies"]
        assert record["client_split"] == "validation"
        assert len(accuracies) == 4 and accuracies == sorted(accuracies)
        assert record["client_accuracy_worst10"] == accuracies[0]  # ceil(4 / 10) = 1 client
        on_test = record["client_test_accuracies"]
        assert (on_test is not None) == (record["round"] >= 2)  # the last 2 of 3 rounds
    assert len(rounds[-1]["client_test_accuracies"]) == 4
    assert rounds[-1]["client_test_accuracy_mean"] > 0.5  # five topics: chance is 0.2
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final_client_accuracy_mean"] == rounds[-1]["client_test_accuracy_mean"]
    assert summary["client_evaluated_on"] == "validation"
    assert read_metrics(results)[-1]["client_test_accuracy_spread"] >= 0
