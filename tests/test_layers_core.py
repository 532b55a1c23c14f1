"""Layer budgets in the core: profile parsing, exact layer matching, freezing, the wire subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from hetfed import adapter_state
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.errors import ConfigError
from hetfed.models import TextClassifier
from hetfed.profiles import parse_profiles
from hetfed.training import Encoded, TrainConfig, train_steps

SPEC = LoraSpec(rank=2, alpha=4.0, target_modules=("query", "value"))


def twelve_layer_host() -> AdapterHost:
    config = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = TextClassifier(BertModel(config, add_pooling_layer=False), num_labels=3)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return AdapterHost(model)


def test_layer_budgets_in_profiles():
    profiles = parse_profiles(
        "tiers: {a: {rank: 2, layers: 3}, b: {rank: 4, layers: 0.5}, c: {rank: 8}}"
    )
    assert [profiles.tier(n).layer_budget(12) for n in "abc"] == [3, 6, 12]
    assert profiles.tier("b").layer_budget(6) == 3
    for bad in ("0", "1.5", "-2", "0.0"):
        with pytest.raises(ConfigError, match="tiers.a.layers"):
            parse_profiles(f"tiers: {{a: {{rank: 2, layers: {bad}}}}}")


def test_layer_of_matches_the_exact_index():
    assert adapter_state.layer_of("m.encoder.layer.1.attention.self.query") == 1
    assert adapter_state.layer_of("m.encoder.layer.10.attention.self.query") == 10
    assert adapter_state.layer_of("model.layers.11.self_attn.q_proj") == 11
    assert adapter_state.layer_of("m.classifier") is None


def test_training_touches_exactly_the_assigned_layers():
    host = twelve_layer_host()
    state = host.initial_state(SPEC, seed=1)
    rng = np.random.default_rng(0)
    state = {k: (rng.normal(size=v.shape) * 0.1).astype(np.float32) for k, v in state.items()}
    model = host.set_state(SPEC, state)
    data = Encoded(
        torch.randint(1, 50, (8, 6)), torch.ones(8, 6, dtype=torch.long), torch.randint(0, 3, (8,))
    )
    with host.train_only_layers(SPEC, [1]):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        train_steps(model, data, TrainConfig(local_steps=3, lr=0.05), seed=0)
    lora_trainable = {n for n in trainable if "lora_" in n}
    assert lora_trainable and all(".layer.1." in n for n in lora_trainable)
    after = host.get_state(SPEC)
    for key in state:
        module_layer = adapter_state.layer_of(key)
        changed = not np.array_equal(after[key], state[key])
        if module_layer is None:
            assert changed  # the head always trains
        else:
            assert changed == (module_layer == 1), key  # layers 10 and 11 untouched
    # freezing is undone for the next client of this process
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_restrict_to_layers_keeps_the_head_and_the_named_blocks():
    state = {
        "e.layer.1.q.lora_A.weight": np.ones((2, 3)),
        "e.layer.1.q.lora_B.weight": np.ones((3, 2)),
        "e.layer.11.q.lora_A.weight": np.ones((2, 3)),
        "e.layer.11.q.lora_B.weight": np.ones((3, 2)),
        "classifier.weight": np.ones((2, 3)),
    }
    kept = adapter_state.restrict_to_layers(state, [1])
    assert sorted(kept) == [
        "classifier.weight",
        "e.layer.1.q.lora_A.weight",
        "e.layer.1.q.lora_B.weight",
    ]


def test_local_training_is_the_same_whatever_the_process_did_before():
    """Dropout is seeded by the client's seed, so a resumed run (other processes, other RNG
    histories) trains every client exactly as the uninterrupted run did."""
    host = twelve_layer_host()
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in host.base_model.modules())
    state = host.initial_state(SPEC, seed=1)
    data = Encoded(
        torch.randint(1, 50, (8, 6)), torch.ones(8, 6, dtype=torch.long), torch.randint(0, 3, (8,))
    )
    results = []
    for history in (0, 1):
        torch.manual_seed(history)  # a different RNG history of the worker process
        model = host.set_state(SPEC, state)
        train_steps(model, data, TrainConfig(local_steps=3, lr=0.05), seed=9)
        results.append(host.get_state(SPEC))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
    assert any(not np.array_equal(results[0][k], state[k]) for k in state)  # it did train
