"""FedIT and HetLoRA on real Flower messages: distribution, reply validation, aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from hetfed import adapter_state, wire
from hetfed import lora_algebra as la
from hetfed.rank_pruning import pruned_rank
from strategies.fedit import FedIT, FedITOptions
from strategies.hetlora import HetLoRA, HetLoRAOptions
from tests.harness import (
    D_OUT,
    MODULES,
    global_state,
    make,
    sparsity_weighted_padding,
    train_round,
    trained,
)


def test_hetlora_sends_truncations_of_each_budget():
    rng = np.random.default_rng(0)
    state = global_state(rng)
    strategy = make(HetLoRA, HetLoRAOptions())
    reply, _ = trained(rng)
    messages, _ = train_round(strategy, state, reply)
    ranks = {m.metadata.dst_node_id: int(m.content[wire.CONFIG][wire.RANK]) for m in messages}
    assert ranks == {1000: 2, 1001: 4, 1002: 8}
    for msg in messages:
        arrays = wire.from_record(msg.content[wire.ARRAYS])
        r = ranks[msg.metadata.dst_node_id]
        a = arrays["layer.0.query.lora_A.weight"]
        np.testing.assert_array_equal(a, state["layer.0.query.lora_A.weight"][:r])
        assert float(msg.content[wire.CONFIG][wire.PRUNE_GAMMA]) == 0.99


def test_hetlora_aggregate_is_sparsity_weighted_sum_of_zero_padded_factors():
    rng = np.random.default_rng(1)
    state = global_state(rng)
    strategy = make(HetLoRA, HetLoRAOptions(), rescale=False)
    reply, sent = trained(rng, n_examples={1000: 5, 1001: 50, 1002: 500})
    _, new = train_round(strategy, state, reply)
    nodes = sorted(sent)
    pairs = [adapter_state.split_state(sent[n])[0] for n in nodes]
    for m, (_, expect_a) in sparsity_weighted_padding(pairs, MODULES).items():
        np.testing.assert_allclose(new[f"{m}.lora_A.weight"], expect_a, rtol=1e-5, atol=1e-6)
    # the head is averaged with the data weights, not the sparsity weights
    p = np.array([5, 50, 500]) / 555
    expect_head = sum(pk * sent[n]["classifier.bias"] for pk, n in zip(p, nodes, strict=False))
    np.testing.assert_allclose(new["classifier.bias"], expect_head, rtol=1e-5)


def test_hetlora_per_module_and_uniform_weighting():
    rng = np.random.default_rng(2)
    state = global_state(rng)
    for weighting in ("sparsity-per-module", "uniform"):
        strategy = make(HetLoRA, HetLoRAOptions(weighting=weighting), rescale=False)
        reply, sent = trained(rng)
        _, new = train_round(strategy, state, reply)
        pairs = [adapter_state.split_state(sent[n])[0] for n in sorted(sent)]
        m = MODULES[1]
        s = np.array([la.product_frobenius_norm(*p[m]) for p in pairs])
        w = s / s.sum() if weighting != "uniform" else np.full(3, 1 / 3)
        expect_b = sum(
            wk * np.pad(p[m][0], ((0, 0), (0, 8 - p[m][0].shape[1])))
            for wk, p in zip(w, pairs, strict=False)
        )
        np.testing.assert_allclose(new[f"{m}.lora_B.weight"], expect_b, rtol=1e-5, atol=1e-6)


def test_hetlora_remembers_a_pruned_rank_and_rejects_other_ranks():
    rng = np.random.default_rng(3)
    state = global_state(rng)
    strategy = make(HetLoRA, HetLoRAOptions(min_rank=2))
    assert pruned_rank(8, 0.99, 2) == 7 and pruned_rank(2, 0.99, 2) == 2
    reply, _ = trained(rng, rank_override=lambda node, r: 7 if r == 8 else r)
    train_round(strategy, state, reply)
    assert strategy.client_rank(1002) == 7
    # metrics.jsonl counts the pruned reply and lists the replies' ranks (tiers 2, 4, 8)
    assert strategy.stats[1].pruned == 1 and strategy.stats[1].reply_ranks == [2, 4, 7]
    # a rank the node could not have pruned to is rejected
    reply, _ = trained(rng, rank_override=lambda node, r: 3 if node == 1002 else r)
    train_round(strategy, state, reply, server_round=2)
    assert strategy.stats[2].replied == 2 and strategy.stats[2].failed == 1
    assert strategy.stats[2].pruned == 0 and strategy.stats[2].reply_ranks == [2, 4]


@pytest.mark.parametrize("fault", ["nan", "shape", "missing", "extra", "int-dtype"])
def test_malformed_replies_are_rejected_and_do_not_touch_the_global_model(fault):
    rng = np.random.default_rng(4)
    state = global_state(rng)

    def corrupt(node, arrays):
        if node != 1001:
            return arrays
        key = "layer.0.value.lora_B.weight"
        if fault == "nan":
            arrays[key] = np.full_like(arrays[key], np.nan)
        elif fault == "shape":
            arrays[key] = np.zeros((D_OUT, 5), np.float32)
        elif fault == "missing":
            del arrays[key]
        elif fault == "extra":
            arrays["evil"] = np.zeros(3, np.float32)
        else:
            arrays[key] = arrays[key].astype(np.int64)
        return arrays

    strategy = make(FedIT, FedITOptions(rank=2))
    reply, sent = trained(rng, mutate=corrupt)
    _, new = train_round(strategy, state, reply)
    assert strategy.stats[1].failed == 1 and strategy.stats[1].replied == 2
    good = [sent[1000], sent[1002]]
    for key in new:
        np.testing.assert_allclose(new[key], (good[0][key] + good[1][key]) / 2, rtol=1e-6)


def test_fedit_is_fedavg_of_factors_at_one_rank():
    rng = np.random.default_rng(5)
    strategy = make(FedIT, FedITOptions())
    assert strategy.global_rank() == 2  # 0 means the smallest tier rank
    state = global_state(rng, rank=2)
    reply, sent = trained(rng, n_examples={1000: 1, 1001: 2, 1002: 7})
    messages, new = train_round(strategy, state, reply)
    assert {int(m.content[wire.CONFIG][wire.RANK]) for m in messages} == {2}
    p = {1000: 0.1, 1001: 0.2, 1002: 0.7}
    for key in new:
        np.testing.assert_allclose(
            new[key], sum(p[n] * sent[n][key] for n in sent), rtol=1e-5, atol=1e-6
        )


def test_round_with_no_valid_reply_keeps_the_global_adapter():
    rng = np.random.default_rng(6)
    strategy = make(FedIT, FedITOptions(rank=2))
    state = global_state(rng, rank=2)
    reply, _ = trained(rng, mutate=lambda node, arrays: {})
    _, new = train_round(strategy, state, reply)
    assert new is None and strategy.stats[1].failed == 3
