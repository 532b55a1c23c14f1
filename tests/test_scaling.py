"""Rank-consistent LoRA scaling (hetfed.scaling) on real Flower messages, every truncation method.

The expected scalings are written out here from their definitions (alpha / r, alpha / sqrt(r),
alpha / r_max with r_max = 8, the harness's largest tier rank), not taken from hetfed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client_apps.local_training import received_spec
from hetfed import wire
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.config import LoraSettings, RunSettings
from hetfed.errors import ConfigError
from hetfed.models import ModelConfig, build_classifier
from hetfed.scaling import lora_scaling, rule_alpha
from server_apps.run_plan import plan_run
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.gd_hla import GDHLA, GDHLAOptions
from strategies.helora_pad import HeLoRAPad, HeLoRAPadOptions
from strategies.hetlora import HetLoRA, HetLoRAOptions
from strategies.rbla import RBLA
from strategies.rgd_hla import RGDHLA, RGDHLAOptions
from strategies.zeropad import ZeroPad
from tests.conftest import TINY_PROFILES
from tests.harness import MODULES, global_state, make, train_round, trained

ALPHA = LoraSettings().alpha
R_MAX = 8
SCALINGS = ("standard", "rslora", "fixed")
# Every method that sends a truncation of one rank-r_max global adapter.
TRUNCATION_METHODS = {
    "zeropad": (ZeroPad, None),
    "hetlora": (HetLoRA, HetLoRAOptions()),
    "helora-pad": (HeLoRAPad, HeLoRAPadOptions()),
    "helora-pad-per-index": (HeLoRAPad, HeLoRAPadOptions(aggregation="per-rank-index")),
    "rbla": (RBLA, None),
    "flexlora": (FlexLoRA, None),
    "gd-hla-hetlora": (GDHLA, GDHLAOptions(ranks="hetlora")),
    "rgd-hla-hetlora": (RGDHLA, RGDHLAOptions(ranks="hetlora")),
}


def scaling_by_definition(rule: str, rank: int) -> float:
    if rule == "standard":
        return ALPHA / rank
    if rule == "rslora":
        return ALPHA / math.sqrt(rank)
    return ALPHA / R_MAX  # fixed


def product(state, module, scaling):
    b = state[f"{module}.lora_B.weight"].astype(np.float64)
    a = state[f"{module}.lora_A.weight"].astype(np.float64)
    return scaling * b @ a


def echo(node, rank, arrays):
    """A client that returns exactly what it was sent."""
    examples = 10 + node % 7
    metrics = MetricRecord({wire.NUM_EXAMPLES: examples, wire.RANK: rank, wire.TRAIN_LOSS: 1.0})
    return RecordDict({wire.ARRAYS: wire.to_record(arrays), wire.METRICS: metrics})


@pytest.mark.parametrize("rule", SCALINGS)
@pytest.mark.parametrize("method", TRUNCATION_METHODS)
def test_sent_model_is_the_global_truncation_at_equal_strength(method, rule):
    """s_k B_k A_k = s_g B[:, :r_k] A[:r_k, :] for every client, to 1e-6."""
    cls, options = TRUNCATION_METHODS[method]
    strategy = make(cls, options, scaling=rule)
    rng = np.random.default_rng(20)
    state = global_state(rng, rank=R_MAX)
    messages, _ = train_round(strategy, state, trained(rng)[0])
    s_g = scaling_by_definition(rule, R_MAX)
    assert strategy.global_spec().scaling == pytest.approx(s_g, rel=1e-12)
    for msg in messages:
        config = msg.content[wire.CONFIG]
        rank = int(config[wire.RANK])
        s_k = scaling_by_definition(rule, rank)
        assert float(config[wire.LORA_SCALING]) == pytest.approx(s_k, rel=1e-12)
        assert config[wire.LORA_RSLORA] is (rule == "rslora")
        sent = wire.from_record(msg.content[wire.ARRAYS])
        for module in MODULES:
            truncated = {
                f"{module}.lora_B.weight": state[f"{module}.lora_B.weight"][:, :rank],
                f"{module}.lora_A.weight": state[f"{module}.lora_A.weight"][:rank],
            }
            np.testing.assert_allclose(
                product(sent, module, s_k), product(truncated, module, s_g), rtol=1e-6, atol=1e-6
            )


@pytest.mark.parametrize("rule", SCALINGS)
def test_a_round_of_echoed_replies_leaves_rbla_unchanged(rule):
    strategy = make(RBLA, None, scaling=rule)
    state = global_state(np.random.default_rng(21), rank=R_MAX)
    _, new = train_round(strategy, state, echo)
    assert strategy.stats[1].replied == 3
    for key, value in state.items():
        np.testing.assert_allclose(new[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", SCALINGS)
@pytest.mark.parametrize("node", [1000, 1001, 1002])
def test_a_single_reply_enters_zero_padding_with_its_product_intact(rule, node):
    """The global's s_g B A equals the client's s_k B_k A_k (zero-padded, weight 1)."""
    strategy = make(ZeroPad, None, scaling=rule)
    rng = np.random.default_rng(22)
    reply, sent = trained(rng, mutate=lambda n, arrays: arrays if n == node else {})
    messages, new = train_round(strategy, global_state(rng, rank=R_MAX), reply)
    assert strategy.stats[1].replied == 1
    rank = {m.metadata.dst_node_id: int(m.content[wire.CONFIG][wire.RANK]) for m in messages}[node]
    s_k, s_g = scaling_by_definition(rule, rank), scaling_by_definition(rule, R_MAX)
    for module in MODULES:
        np.testing.assert_allclose(
            product(new, module, s_g), product(sent[node], module, s_k), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("rule", ["standard", "rslora"])
def test_hetlora_converts_a_pruned_reply_with_the_scaling_it_trained_at(rule):
    """The rank-4 client trains at s(4) and prunes to 3: its product enters at s(4), not s(3)."""
    strategy = make(HetLoRA, HetLoRAOptions(), scaling=rule)
    rng = np.random.default_rng(23)
    reply, sent = trained(
        rng,
        rank_override=lambda node, r: 3 if r == 4 else r,
        mutate=lambda node, arrays: arrays if node == 1001 else {},
    )
    _, new = train_round(strategy, global_state(rng, rank=R_MAX), reply)
    assert strategy.stats[1].replied == 1 and strategy.client_rank(1001) == 3
    s_trained, s_pruned = scaling_by_definition(rule, 4), scaling_by_definition(rule, 3)
    s_g = scaling_by_definition(rule, R_MAX)
    for module in MODULES:
        got = product(new, module, s_g)
        expect = product(sent[1001], module, s_trained)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, product(sent[1001], module, s_pruned), rtol=1e-3)
    # next round it is sent rank 3 and trains at s(3)
    messages, _ = train_round(strategy, new, trained(rng)[0], server_round=2)
    config = next(m for m in messages if m.metadata.dst_node_id == 1001).content[wire.CONFIG]
    assert int(config[wire.RANK]) == 3
    assert float(config[wire.LORA_SCALING]) == pytest.approx(s_pruned, rel=1e-12)


def test_without_rescale_the_factors_travel_unconverted():
    """lora.rescale = false: the sent factors are the plain truncation (the authors' codes)."""
    strategy = make(ZeroPad, None, rescale=False)
    rng = np.random.default_rng(24)
    state = global_state(rng, rank=R_MAX)
    messages, _ = train_round(strategy, state, trained(rng)[0])
    for msg in messages:
        rank = int(msg.content[wire.CONFIG][wire.RANK])
        sent = wire.from_record(msg.content[wire.ARRAYS])
        for module in MODULES:
            key = f"{module}.lora_B.weight"
            np.testing.assert_array_equal(sent[key], state[key][:, :rank])


def test_fixed_scaling_gives_every_rank_alpha_over_r_max():
    assert [rule_alpha("fixed", 16.0, r, 8) for r in (2, 4, 8)] == [4.0, 8.0, 16.0]
    assert {lora_scaling(rule_alpha("fixed", 16.0, r, 8), r) for r in (2, 4, 8)} == {2.0}
    assert rule_alpha("rslora", 16.0, 2, 8) == rule_alpha("standard", 16.0, 2, 8) == 16.0


def test_scaling_options_are_checked():
    with pytest.raises(ConfigError, match="lora.scaling.*standard | rslora | fixed"):
        LoraSettings(scaling="alpha/r")
    with pytest.raises(ConfigError, match="lora.rescale"):
        make(FlexLoRA, None, rescale=False)
    with pytest.raises(ConfigError, match="lora.scaling"):
        make(FLoRA, None, scaling="rslora")


def _train_instruction(rank, alpha, rslora, scaling):
    config = {
        wire.SERVER_ROUND: 1,
        wire.SEED: 0,
        wire.RANK: rank,
        wire.LORA_ALPHA: alpha,
        wire.LORA_RSLORA: rslora,
        wire.LORA_SCALING: scaling,
    }
    return wire.TrainInstruction.from_record(ConfigRecord(config))


def test_the_client_builds_the_scaling_it_is_told_and_refuses_another():
    settings = RunSettings()
    spec = received_spec(_train_instruction(4, 16.0, True, 8.0), settings)
    assert (spec.rank, spec.alpha, spec.rslora, spec.scaling) == (4, 16.0, True, 8.0)
    with pytest.raises(ValueError, match="scaling 4.0"):
        received_spec(_train_instruction(4, 16.0, True, 4.0), settings)  # alpha / r, not / sqrt(r)
    with pytest.raises(ValueError, match="cannot build"):
        received_spec(_train_instruction(4, -1.0, False, -0.25), settings)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_builds_the_adapter_at_the_spec_scaling(rslora):
    model, _ = build_classifier(ModelConfig(name="tiny-random-bert"), num_labels=3, seed=0)
    host = AdapterHost(model)
    spec = LoraSpec(4, 16.0, ("query", "value"), rslora=rslora)
    host.set_state(spec, host.initial_state(spec, seed=0))
    assert host.built_scaling(spec) == {8.0 if rslora else 4.0} == {spec.scaling}


def test_a_homogeneous_rank_above_a_tier_budget_is_refused_before_the_run(tmp_path, tiny_config):
    """FedIT's upper reference at r_max needs profiles in which every device affords r_max."""
    (tmp_path / "profiles.yaml").write_text(TINY_PROFILES)  # ranks 2, 4, 8
    config = {**tiny_config, "strategy": "fedit", "fedit.rank": 8}
    with pytest.raises(ConfigError, match="tier small affords rank 2") as info:
        plan_run(config, tmp_path)
    assert info.value.key == "fedit.rank"
    (tmp_path / "upper.yaml").write_text("tiers: {every-device: {rank: 8}}")
    plan = plan_run({**config, "profiles": "upper.yaml"}, tmp_path)
    assert plan.build_strategy().global_rank() == 8
