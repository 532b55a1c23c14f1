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
from hetfed.data_config import DataConfig
from hetfed.errors import ConfigError
from hetfed.metrics import client_distribution
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
    train, test = local_split(partition, cfg, partition_id=5)
    assert (len(train), len(test)) == (30, 10)
    assert sorted([*train["text"], *test["text"]]) == sorted(partition["text"])
    again_train, again_test = local_split(partition, cfg, partition_id=5)
    assert list(again_test["text"]) == list(test["text"])
    assert list(again_train["text"]) == list(train["text"])
    _, other = local_split(partition, cfg, partition_id=6)
    assert list(other["text"]) != list(test["text"])  # each client its own draw


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"fraction-evaluate": 0.5}, "data.local-test-fraction"),
        ({"data.local-test-fraction": 0.2}, "fraction-evaluate"),
        ({"fraction-evaluate": 1.5, "data.local-test-fraction": 0.2}, "fraction-evaluate"),
        ({"fraction-evaluate": 0.5, "data.local-test-fraction": 1.0}, "data.local-test-fraction"),
    ],
)
def test_federated_evaluation_keys_are_checked_together(config, key):
    with pytest.raises(ConfigError) as info:
        parse_run_config(config)
    assert info.value.key == key


def _strategy() -> HetLoRA:
    settings = RunSettings(
        min_train_nodes=1,
        min_available_nodes=3,
        lora=LoraSettings(),
        fraction_evaluate=1.0,
        data=DataConfig(local_test_fraction=0.2),
    )
    return HetLoRA(settings, PROFILES, HetLoRAOptions())


def _evaluate_reply(msg: Message, accuracy: float, examples: int = 10) -> Message:
    reply = wire.EvaluateReply(num_examples=examples, accuracy=accuracy, loss=1.0)
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


def test_without_fraction_evaluate_no_client_is_asked():
    strategy = HetLoRA(RunSettings(min_available_nodes=3), PROFILES, HetLoRAOptions())
    grid = InProcessGrid(profiles=strategy.profiles)
    state = wire.to_record(global_state(np.random.default_rng(0)))
    assert list(strategy.configure_evaluate(1, state, None, grid)) == []


@pytest.mark.slow
def test_a_run_evaluates_on_the_clients_own_test_splits(run_scenario, tiny_config):
    """Through flwr run: every round after the first, all four clients score the global model
    on their own held-out quarter; the distribution lands in metrics.jsonl and summary.json."""
    config = {**tiny_config, "fraction-evaluate": 1.0, "data.local-test-fraction": 0.25}
    proc, results = run_scenario(config)
    rounds = learned_rounds(proc, results)
    assert rounds[0]["client_accuracies"] is None  # round 0: the central evaluation only
    for record in rounds[1:]:
        accuracies = record["client_accuracies"]
        assert len(accuracies) == 4 and accuracies == sorted(accuracies)
        assert record["client_accuracy_worst10"] == accuracies[0]  # ceil(4 / 10) = 1 client
    assert rounds[-1]["client_accuracy_mean"] > 0.5  # five topics: chance is 0.2
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final_client_accuracy_mean"] == rounds[-1]["client_accuracy_mean"]
    assert read_metrics(results)[-1]["client_accuracy_spread"] >= 0
