"""Reliability on real Flower messages: failures, retries, garbage replies, checkpoints, resume.

End-to-end counterparts (a run with 30% failing clients, kill and resume through ``flwr run``)
are in tests/test_end_to_end.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from hetfed import adapter_state, wire
from hetfed.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from hetfed.config import FaultSettings, RunSettings
from hetfed.errors import ConfigError
from hetfed.faults import injected_fault
from strategies.hetlora import HetLoRA, HetLoRAOptions
from strategies.zeropad import ZeroPad
from tests.harness import PROFILES, InProcessGrid, _reply, global_state

TIERS10 = ("s", "m", "l", "s", "m", "l", "s", "m", "l", "s")


def strategy_of(cls=HetLoRA, options=None, **settings):
    base = {"min_train_nodes": 1, "min_available_nodes": 3, "seed": 5}
    if options is None and cls.options_class is not None:
        options = cls.options_class()
    return cls(RunSettings(**{**base, **settings}), PROFILES, options)


def trainer(log=None, fail=lambda client, server_round: False, step=0.05):
    """Replies as a client would, deterministically: sent arrays + noise seeded by
    (client, round); ``fail(client, round)`` decides which replies never come."""

    def train(client, msg):
        config = msg.content[wire.CONFIG]
        server_round = int(config[wire.SERVER_ROUND])
        if log is not None:
            log.append((server_round, client))
        if fail(client, server_round):
            return None
        arrays = wire.from_record(msg.content[wire.ARRAYS])
        rng = np.random.default_rng([client, server_round])
        new = {k: (v + step * rng.normal(size=v.shape)).astype(v.dtype) for k, v in arrays.items()}
        metrics = MetricRecord(
            {
                wire.NUM_EXAMPLES: 10 + client,
                wire.RANK: int(config[wire.RANK]),
                wire.TRAIN_LOSS: 1.0,
            }
        )
        return RecordDict({wire.ARRAYS: wire.to_record(new), wire.METRICS: metrics})

    return train


def run_rounds(strategy, grid, state, rounds, first_round=1, on_round_end=None):
    result = strategy.start(
        grid,
        wire.to_record(state),
        num_rounds=rounds,
        first_round=first_round,
        on_round_end=on_round_end,
    )
    return wire.from_record(result.arrays)


def assert_same_state(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=atol, err_msg=key)


# --------------------------------------------------------------------- too few replies


def test_a_round_without_enough_replies_is_retried_with_a_fresh_sample():
    calls = []

    def fail(client, server_round):
        calls.append(server_round)
        return calls.count(1) <= 6  # the first attempt's six replies are all lost

    sampled = []
    strategy = strategy_of(fraction_train=0.67, min_train_replies=2, max_retries=2)
    grid = InProcessGrid(TIERS10, train=trainer(log=sampled, fail=fail))
    state = global_state(np.random.default_rng(0))
    new = run_rounds(strategy, grid, state, rounds=1)
    stats = strategy.stats[1]
    assert stats.attempts == 2 and not stats.skipped
    assert stats.sampled == 12 and stats.replied == 6 and stats.failed == 6
    first, second = [c for r, c in sampled[:6]], [c for r, c in sampled[6:]]
    assert first != second  # a fresh, seeded sample
    assert not np.array_equal(
        new["layer.0.query.lora_A.weight"], state["layer.0.query.lora_A.weight"]
    )


@pytest.mark.parametrize(("policy", "attempts"), [("skip", 1), ("retry", 3)])
def test_a_round_that_stays_below_the_minimum_is_skipped_and_keeps_the_global(policy, attempts):
    strategy = strategy_of(too_few_replies=policy, max_retries=2, min_train_replies=2)
    grid = InProcessGrid(train=trainer(fail=lambda client, r: client != 1000))
    state = global_state(np.random.default_rng(1))
    new = run_rounds(strategy, grid, state, rounds=2)
    for server_round in (1, 2):
        stats = strategy.stats[server_round]
        assert stats.skipped and stats.attempts == attempts
        assert stats.replied == attempts and stats.failed == 2 * attempts
    assert_same_state(new, state)


# --------------------------------------------------------------------- injected faults


def test_fault_injection_picks_a_seeded_fraction_of_each_rounds_clients():
    faults = FaultSettings(fraction=0.3, kinds="raise,nan")

    def faulty(strategy, server_round):
        messages = strategy.configure_train(
            server_round,
            wire.to_record(global_state(np.random.default_rng(0))),
            ConfigRecord(),
            InProcessGrid(TIERS10),
        )
        return {
            m.metadata.dst_node_id: str(m.content[wire.CONFIG][wire.FAULT])
            for m in messages
            if wire.FAULT in m.content[wire.CONFIG]
        }

    rounds = [faulty(strategy_of(faults=faults), r) for r in (1, 2, 3)]
    assert all(len(f) == 3 for f in rounds)  # round(0.3 * 10)
    assert all(set(f.values()) <= {"raise", "nan"} for f in rounds)
    assert len({tuple(sorted(f)) for f in rounds}) > 1  # other clients in other rounds
    assert faulty(strategy_of(faults=faults), 2) == rounds[1]  # and the same again


@pytest.mark.parametrize("kind", ["nan", "shape", "missing-key"])
def test_garbage_from_the_client_is_rejected_and_the_rest_aggregated_as_without_it(kind):
    """A client told to send garbage (the ClientApp's own fault code) is rejected with a
    reason; the new global equals the one aggregated from the other replies alone."""
    state = global_state(np.random.default_rng(2))
    train = trainer()

    def with_garbage(client, msg):
        if client == 1001:
            return injected_fault(msg, kind, 0.0).content
        return train(client, msg)

    garbage = strategy_of(ZeroPad)
    new = run_rounds(garbage, InProcessGrid(train=with_garbage), state, rounds=1)
    assert garbage.stats[1].rejected == 1 and garbage.stats[1].replied == 2
    dropped = strategy_of(ZeroPad)
    grid = InProcessGrid(train=lambda client, msg: None if client == 1001 else train(client, msg))
    assert_same_state(new, run_rounds(dropped, grid, state, rounds=1))


def test_raise_and_timeout_faults():
    msg = Message(
        RecordDict(
            {
                wire.ARRAYS: wire.to_record(global_state(np.random.default_rng(3), rank=2)),
                wire.CONFIG: ConfigRecord({wire.RANK: 2}),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    with pytest.raises(RuntimeError, match="injected fault"):
        injected_fault(msg, "raise", 0.0)
    reply = injected_fault(msg, "timeout", 0.01)  # late, but well formed
    assert (
        wire.from_record(reply.content[wire.ARRAYS]).keys()
        == wire.from_record(msg.content[wire.ARRAYS]).keys()
    )


def test_update_norm_bound_rejects_large_updates():
    state = global_state(np.random.default_rng(4))

    def train(client, msg):
        return trainer(step=100.0 if client == 1002 else 0.01)(client, msg)

    strategy = strategy_of(ZeroPad, max_update_norm=5.0)
    run_rounds(strategy, InProcessGrid(train=train), state, rounds=1)
    assert strategy.stats[1].rejected == 1 and strategy.stats[1].replied == 2


# --------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "budget",
    [
        {wire.RANK: 2, wire.CLIENT_ID: 0},  # no tier
        {wire.TIER: "xl", wire.RANK: 2, wire.CLIENT_ID: 0},  # unknown tier
        {wire.TIER: "s", wire.RANK: 64, wire.CLIENT_ID: 0},  # above the tier's rank
        {wire.TIER: "s", wire.RANK: 2, wire.CLIENT_ID: "zero"},  # not a number
        {wire.TIER: "s", wire.RANK: 2},  # no client id
    ],
)
def test_a_malformed_budget_reply_leaves_the_node_out_without_failing(budget, caplog):
    class BadBudgetGrid(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = super().send_and_receive(messages, timeout)
            if messages[0].metadata.message_type == "query":
                replies[0] = _reply(messages[0], RecordDict({wire.BUDGET: ConfigRecord(budget)}))
            return replies

    strategy = strategy_of()
    grid = BadBudgetGrid(train=trainer())
    run_rounds(strategy, grid, global_state(np.random.default_rng(5)), rounds=1)
    assert sorted(strategy.budgets) == [1001, 1002]
    assert "node 1000 has no budget" in caplog.text


def test_two_nodes_claiming_one_client_id_keep_the_first(caplog):
    strategy = strategy_of()
    grid = InProcessGrid(train=trainer(), client_ids=[7, 7, 8])
    run_rounds(strategy, grid, global_state(np.random.default_rng(6)), rounds=1)
    assert sorted(strategy.budgets) == [7, 8]
    assert "client id 7 is already used by connected node" in caplog.text


# --------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_atomic_replace(tmp_path, monkeypatch):
    state = global_state(np.random.default_rng(7))
    first = Checkpoint(
        2, state, "hetlora", {"ranks": {"3": 4}}, [{"round": 0}], 1.5, {"seed": 1}, {"3": "m"}
    )
    save_checkpoint(tmp_path, first)
    loaded = load_checkpoint(tmp_path)
    assert loaded.server_round == 2 and loaded.strategy_state == {"ranks": {"3": 4}}
    assert loaded.records == [{"round": 0}] and loaded.run_config == {"seed": 1}
    assert loaded.node_budgets == {"3": "m"}
    assert_same_state(loaded.state, state)
    for key in state:
        assert loaded.state[key].dtype == state[key].dtype

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)  # a write that dies half way
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, replace(first, server_round=3))
    assert load_checkpoint(tmp_path).server_round == 2  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".npz"] == [CHECKPOINT_FILE]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    ckpt = Checkpoint(1, {}, "hetlora", {}, [], 0.0, {"seed": 1, "num-server-rounds": 3})
    check_resumable(ckpt, {"seed": 1, "num-server-rounds": 9, "resume": True}, tmp_path)
    with pytest.raises(ConfigError) as info:
        check_resumable(ckpt, {"seed": 2, "num-server-rounds": 3}, tmp_path)
    assert info.value.key == "seed" and "as in the run being resumed" in str(info.value)
    assert CHECKPOINT_FILE in str(info.value)


def test_resumed_rounds_equal_uninterrupted_rounds_under_new_node_ids(tmp_path):
    """Kill after round 2 of 4, resume in a 'new run' whose node ids differ: same final state.

    HetLoRA with rank self-pruning keeps per-client ranks, the state a checkpoint must carry.
    """
    options = HetLoRAOptions(prune=True, prune_gamma=0.5, min_rank=1)

    def prunes(client, msg):  # client 1 answers at its pruned rank from round 2 on
        reply = trainer()(client, msg)
        config = msg.content[wire.CONFIG]
        if client == 1 and int(config[wire.SERVER_ROUND]) >= 2 and int(config[wire.RANK]) == 4:
            arrays = adapter_state.truncate_state(wire.from_record(reply[wire.ARRAYS]), 2)
            reply[wire.ARRAYS] = wire.to_record(arrays)
            reply[wire.METRICS][wire.RANK] = 2
        return reply

    def grid(first_node, order):
        tiers = [("s", "m", "l")[c] for c in order]
        return InProcessGrid(tiers, train=prunes, first_node=first_node, client_ids=order)

    state = global_state(np.random.default_rng(8))
    settings = {"fraction_train": 0.67, "min_train_nodes": 2}
    whole = strategy_of(HetLoRA, options, **settings)
    expected = run_rounds(whole, grid(1000, [0, 1, 2]), state, rounds=4)

    killed = strategy_of(HetLoRA, options, **settings)

    def save(server_round, arrays):
        ckpt = Checkpoint(
            server_round, wire.from_record(arrays), killed.name, killed.state_dict(), [], 0.0, {}
        )
        save_checkpoint(tmp_path, ckpt)

    run_rounds(killed, grid(1000, [0, 1, 2]), state, rounds=2, on_round_end=save)
    ckpt = load_checkpoint(tmp_path)
    json.dumps(ckpt.strategy_state)  # JSON types only
    resumed = strategy_of(HetLoRA, options, **settings)
    resumed.load_state_dict(ckpt.strategy_state)
    assert resumed.ranks == killed.ranks and killed.ranks[1] == 2  # client 1 pruned
    final = run_rounds(resumed, grid(5000, [2, 0, 1]), ckpt.state, rounds=4, first_round=3)
    assert_same_state(final, expected)
    assert resumed.stats[4].ranks == whole.stats[4].ranks
