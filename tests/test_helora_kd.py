"""HeLoRA-KD: per-group FedAvg on real Flower messages; server mutual learning on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetfed import adapter_state, wire
from hetfed.config import RunSettings
from hetfed.data_config import DataConfig
from hetfed.errors import ConfigError
from hetfed.models import ModelConfig
from hetfed.server_model import ServerModel
from strategies.helora_kd import (
    HeLoRAKD,
    HeLoRAKDOptions,
    group_prefix,
    join_groups,
    split_groups,
)
from tests import harness
from tests.conftest import COMMON, TOPICS
from tests.harness import PROFILES, InProcessGrid, global_state, topic_server, trained


def state_rank(state):
    """The one rank of an adapter's LoRA modules."""
    (rank,) = {a.shape[0] for _, a in adapter_state.split_state(state)[0].values()}
    return rank


MODEL = ModelConfig(name="tiny-random-bert", max_length=32)
SERVER_SETTINGS = dict(min_train_nodes=1, min_available_nodes=3, seed=3)


def settings(**kwargs) -> RunSettings:
    return RunSettings(
        model=MODEL, data=DataConfig(server_examples=32), **{**SERVER_SETTINGS, **kwargs}
    )


def topic_texts(rng: np.random.Generator, n: int) -> tuple[list[str], list[int]]:
    """Synthetic topic texts as in tests/conftest.py's write_topics_corpus."""
    names = sorted(TOPICS)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(len(names)))
        words = TOPICS[names[label]].split()
        texts.append(
            " ".join(
                words[rng.integers(len(words))]
                if rng.random() < 0.7
                else COMMON[rng.integers(len(COMMON))]
                for _ in range(16)
            )
        )
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def server() -> ServerModel:
    return topic_server(MODEL, settings(), topic_texts, 32, 16)


def train_round(strategy, state, reply_fn, tiers=("s", "m", "l"), server_round=1):
    """tests.harness.train_round over a grid with the given node tiers."""
    return harness.train_round(strategy, state, reply_fn, server_round, InProcessGrid(tiers))


def public_kl(server: ServerModel, strategy: HeLoRAKD, state) -> float:
    """Mean over ordered pairs of groups of KL(p_j || p_m) on the public split, in numpy."""
    probs = []
    with server.host.lock:
        for rank, arrays in split_groups(state).items():
            model = server.load(strategy.spec(rank), arrays)
            model.eval()
            with torch.no_grad():
                logits = model(
                    input_ids=server.public.input_ids, attention_mask=server.public.attention_mask
                )
            probs.append(torch.softmax(logits.double(), -1).numpy())
    kls = [
        np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
        for i, p in enumerate(probs)
        for j, q in enumerate(probs)
        if i != j
    ]
    return float(np.mean(kls))


def shrink(node, arrays):
    """Keep the random 'trained' arrays small enough for a sensible model."""
    return {k: (0.3 * v).astype(np.float32) for k, v in arrays.items()}


@pytest.mark.parametrize("mode", ["ensemble", "pairwise"])
def test_mutual_learning_keeps_each_group_and_reduces_the_disagreement(server, mode):
    rng = np.random.default_rng(1)
    options = HeLoRAKDOptions(distillation=mode, lr=5e-3, epochs=2, batch_size=8)
    strategy = HeLoRAKD(settings(), PROFILES, options)
    strategy.bind(server)
    state = strategy.initial_state()
    groups = split_groups(state)
    assert sorted(groups) == [2, 4, 8]
    # every group is the truncation of one fresh rank-8 adapter
    for r, arrays in groups.items():
        assert state_rank(arrays) == r
        for key, value in arrays.items():
            np.testing.assert_array_equal(value, adapter_state.truncate_state(groups[8], r)[key])

    reply, sent = trained(rng, mutate=shrink)  # one node per tier: each group has one reply
    messages, new = train_round(strategy, state, reply)
    assert {int(m.content[wire.CONFIG][wire.RANK]) for m in messages} == {2, 4, 8}
    fedavg = join_groups({state_rank(s): s for s in sent.values()})

    # the distillation leaves every group's structure as it was
    assert set(new) == set(state)
    for key, value in new.items():
        assert value.shape == state[key].shape and value.dtype == np.float32
        assert np.all(np.isfinite(value))
    assert any(not np.allclose(new[k], fedavg[k]) for k in new)  # and it did train

    record = strategy.last_distillation
    assert record["steps"] == 2 * 4  # 2 epochs of 32 examples in batches of 8
    assert record["kl_after"] < 0.5 * record["kl_before"]
    assert record["pairwise_after"] < 0.5 * record["pairwise_before"]
    for r in (2, 4, 8):
        assert record["per_group_after"][r] < record["per_group_before"][r]
    # checked independently of the strategy's own bookkeeping
    before, after = public_kl(server, strategy, fedavg), public_kl(server, strategy, new)
    assert after < 0.5 * before
    np.testing.assert_allclose(before, record["pairwise_before"], rtol=1e-3)

    # the server evaluates and exports the rank-8 group
    spec, view, deltas = strategy.model_view(new)
    assert spec == strategy.global_spec() and spec.rank == 8 and deltas == {}
    assert set(view) == {k.removeprefix(group_prefix(8)) for k in new if k.startswith("group-r8/")}


def test_each_group_is_fedavg_of_its_own_clients_and_silent_groups_are_kept():
    rng = np.random.default_rng(2)
    base = global_state(rng, rank=8)
    state = join_groups({r: adapter_state.truncate_state(base, r) for r in (2, 4, 8)})
    for r in (2, 4):  # groups differ from one another
        state[group_prefix(r) + "classifier.bias"] = rng.normal(size=3).astype(np.float32)
    strategy = HeLoRAKD(settings(min_available_nodes=5), PROFILES, HeLoRAKDOptions(epochs=0))
    tiers = ("s", "s", "s", "m", "m")  # nodes 1000-1002 rank 2, 1003-1004 rank 4, none rank 8
    n = {1000: 5, 1001: 15, 1002: 30, 1003: 1, 1004: 3}
    reply, sent = trained(rng, n_examples=n)
    messages, new = train_round(strategy, state, reply, tiers=tiers)

    # each node got its group's adapter, un-prefixed
    for msg in messages:
        rank = int(msg.content[wire.CONFIG][wire.RANK])
        arrays = wire.from_record(msg.content[wire.ARRAYS])
        assert set(arrays) == set(split_groups(state)[rank])
        for key, value in arrays.items():
            np.testing.assert_array_equal(value, state[group_prefix(rank) + key])

    assert set(new) == set(state)
    for rank, members in ((2, (1000, 1001, 1002)), (4, (1003, 1004))):
        total = sum(n[k] for k in members)
        for key in split_groups(state)[rank]:
            expect = sum(n[k] / total * sent[k][key] for k in members)
            np.testing.assert_allclose(new[group_prefix(rank) + key], expect, rtol=1e-5, atol=1e-6)
    for key in split_groups(state)[8]:
        np.testing.assert_array_equal(new[group_prefix(8) + key], state[group_prefix(8) + key])


def test_a_missing_public_split_is_a_config_error(server):
    with pytest.raises(ConfigError, match="data.server-examples") as err:
        HeLoRAKD(RunSettings(), PROFILES, HeLoRAKDOptions())
    assert err.value.key == "data.server-examples" and ">= 1" in str(err.value)
    strategy = HeLoRAKD(settings(), PROFILES, HeLoRAKDOptions())
    no_public = ServerModel(server.settings, server.host, server.test, None)
    with pytest.raises(ConfigError, match="helora-kd needs >= 1") as err:
        strategy.bind(no_public)
    assert err.value.key == "data.server-examples"


@pytest.mark.parametrize(
    "field,value,key",
    [
        ("distillation", "mean", "helora-kd.distillation"),
        ("temperature", 0.0, "helora-kd.temperature"),
        ("lr", 0.0, "helora-kd.lr"),
        ("epochs", -1, "helora-kd.epochs"),
        ("batch_size", 0, "helora-kd.batch-size"),
    ],
)
def test_options_are_validated(field, value, key):
    with pytest.raises(ConfigError) as err:
        HeLoRAKDOptions(**{field: value})
    assert err.value.key == key
