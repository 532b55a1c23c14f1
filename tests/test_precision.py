"""GPU-ready training: ``train.precision`` (autocast), ``model.dtype`` (the frozen base's
weights) and ``model.quantize`` (bitsandbytes). Bad values and what a device cannot run are
refused naming the key; bf16 learns on the tiny models with float32 LoRA factors, head and
optimizer state; a bfloat16 base keeps a float32 adapter on the wire."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from client_apps.local_training import worker_for
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.config import RunSettings, parse_run_config, require_runs_on, setting
from hetfed.data import load_splits
from hetfed.data_config import DataConfig
from hetfed.errors import ConfigError
from hetfed.models import ModelConfig, build_model
from hetfed.training import TrainConfig, encode_for_task, evaluate, train_steps
from server_apps.run_plan import plan_run
from strategies.flora import FLoRA
from tests.conftest import TINY_PROFILES, adapter_tensors, learned_rounds
from tests.harness import PROFILES

TINY_BERT = ModelConfig(name="tiny-random-bert", max_length=32)
TINY_LLAMA = ModelConfig(name="tiny-random-llama", task="instruction", max_length=40)
BERT_MODULES = ("query", "value")
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("train.precision", "float16", "fp32 | bf16 | fp16"),
        ("train.precision", "FP32", "fp32 | bf16 | fp16"),
        ("model.dtype", "bf16", "float32 | bfloat16 | float16"),
        ("model.quantize", "nf4", "none | 4bit | 8bit"),
        ("model.quantize", "", "none | 4bit | 8bit"),
    ],
)
def test_bad_values_are_refused_naming_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value})
    assert (err.value.key, err.value.value) == (key, value)
    assert allowed in str(err.value) and repr(value) in str(err.value)


def test_a_value_of_the_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="train.precision.*a string"):
        parse_run_config({"train.precision": 16})


def _settings(**flat) -> RunSettings:
    return parse_run_config(flat, strict=False)[0]


@pytest.mark.parametrize(
    ("flat", "key", "needs"),
    [
        ({"model.quantize": "4bit"}, "model.quantize", "4bit needs a CUDA GPU"),
        ({"model.quantize": "8bit"}, "model.quantize", "8bit needs a CUDA GPU"),
        ({"train.precision": "fp16"}, "train.precision", "fp16 needs a CUDA GPU"),
        ({"model.dtype": "float16"}, "model.dtype", "float16 needs a CUDA GPU"),
    ],
)
def test_a_cpu_refuses_quantized_and_float16_runs(flat, key, needs):
    with pytest.raises(ConfigError) as err:
        require_runs_on(_settings(**flat), CPU)
    assert err.value.key == key and "on this cpu device" in err.value.allowed
    assert needs in err.value.allowed
    require_runs_on(_settings(**{key: setting(RunSettings(), key)}), CPU)  # the default runs
    if key != "model.quantize":
        return
    if importlib.util.find_spec("bitsandbytes") is None:  # a GPU without bitsandbytes
        with pytest.raises(ConfigError, match="model.quantize.*pip install 'hetfed\\[qlora\\]'"):
            require_runs_on(_settings(**flat), CUDA)


def test_bf16_and_bfloat16_run_on_a_cpu():
    require_runs_on(_settings(**{"train.precision": "bf16", "model.dtype": "bfloat16"}), CPU)


def test_the_tiny_random_models_cannot_be_quantized():
    with pytest.raises(ConfigError, match="model.quantize.*built from a config"):
        ModelConfig(name="tiny-random-llama", quantize="4bit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA does")
def test_a_quantized_run_is_refused_before_training(tmp_path, tiny_config):
    """Without CUDA, the run plan (the server, hetfed check) and the ClientApp's worker refuse
    a 4-bit base before any weights or data load."""
    (tmp_path / "profiles.yaml").write_text(TINY_PROFILES)
    config = {**tiny_config, "model.name": "all-MiniLM-L6-v2", "model.quantize": "4bit"}
    with pytest.raises(ConfigError, match="model.quantize.*'4bit'.*needs a CUDA GPU"):
        plan_run(config, tmp_path)
    with pytest.raises(ConfigError, match="model.quantize.*'4bit'.*needs a CUDA GPU"):
        worker_for(parse_run_config(config, strict=False)[0])
    fp16 = {**tiny_config, "train.precision": "fp16"}
    with pytest.raises(ConfigError, match="train.precision.*'fp16'.*needs a CUDA GPU"):
        plan_run(fp16, tmp_path)


def test_flora_refuses_a_quantized_base():
    settings = RunSettings(model=ModelConfig(quantize="4bit"), min_available_nodes=3)
    with pytest.raises(ConfigError, match="model.quantize.*none for flora.*base weights"):
        FLoRA(settings, PROFILES)


@contextmanager
def optimizer_state_dtypes():
    """The dtypes of every tensor in the state of the optimizers that step inside the block
    (observed through torch's global step hook)."""
    seen: set[torch.dtype] = set()

    def record(optimizer, args, kwargs):
        for state in optimizer.state.values():
            seen.update(v.dtype for k, v in state.items() if torch.is_tensor(v) and k != "step")

    handle = register_optimizer_step_post_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def _split(cfg: ModelConfig, splits, split, tokenizer):
    return encode_for_task(
        cfg, list(split["text"]), list(split["label"]), splits.label_names, tokenizer
    )


@dataclass
class Learned:
    """An adapter trained on the topics corpus, and how it went."""

    host: AdapterHost
    spec: LoraSpec
    model: torch.nn.Module  # the peft model
    losses: tuple[float, float]  # test loss before and after
    accuracies: tuple[float, float]
    optimizer_state: set[torch.dtype]


def _learn(topics_corpus, cfg: ModelConfig, modules, train_cfg: TrainConfig) -> Learned:
    splits = load_splits(DataConfig(source=str(topics_corpus)))
    model, tokenizer = build_model(cfg, len(splits.label_names), seed=0)
    host, spec = AdapterHost(model), LoraSpec(8, 16.0, modules)
    peft_model = host.set_state(spec, host.initial_state(spec, seed=0))
    train = _split(cfg, splits, splits.train, tokenizer)
    test = _split(cfg, splits, splits.test, tokenizer)
    accuracy_before, loss_before = evaluate(peft_model, test, 64, train_cfg.precision)
    with optimizer_state_dtypes() as state_dtypes:
        train_steps(peft_model, train, train_cfg, seed=0)
    accuracy_after, loss_after = evaluate(peft_model, test, 64, train_cfg.precision)
    return Learned(
        host,
        spec,
        peft_model,
        (loss_before, loss_after),
        (accuracy_before, accuracy_after),
        state_dtypes,
    )


def _trainable_dtypes(peft_model) -> set[torch.dtype]:
    return {p.dtype for p in peft_model.parameters() if p.requires_grad}


def test_bf16_autocast_learns_a_classifier_in_float32_parameters(topics_corpus):
    train_cfg = TrainConfig(local_steps=40, batch_size=16, lr=0.02, precision="bf16")
    run = _learn(topics_corpus, TINY_BERT, BERT_MODULES, train_cfg)
    assert run.losses[1] < run.losses[0] / 2 and run.accuracies[1] > run.accuracies[0] + 0.3
    assert _trainable_dtypes(run.model) == {torch.float32}  # LoRA factors and the head
    grads = {p.grad.dtype for p in run.model.parameters() if p.grad is not None}
    assert grads == {torch.float32}
    assert run.optimizer_state == {torch.float32}  # AdamW's moments
    assert {v.dtype for v in run.host.get_state(run.spec).values()} == {np.dtype(np.float32)}


def test_bf16_autocast_learns_the_instruction_task(topics_corpus):
    train_cfg = TrainConfig(local_steps=150, batch_size=16, lr=0.01, precision="bf16")
    run = _learn(topics_corpus, TINY_LLAMA, LLAMA_MODULES, train_cfg)
    assert run.losses[1] < run.losses[0] / 3 and run.accuracies[1] > run.accuracies[0] + 0.1
    assert _trainable_dtypes(run.model) == {torch.float32}
    assert run.optimizer_state == {torch.float32}


@pytest.mark.parametrize(
    ("cfg", "modules", "steps", "lr"),
    [
        (TINY_BERT, BERT_MODULES, 40, 0.02),
        (TINY_LLAMA, LLAMA_MODULES, 150, 0.01),
    ],
    ids=["classification", "instruction"],
)
def test_a_bfloat16_base_trains_a_float32_adapter(topics_corpus, cfg, modules, steps, lr):
    """model.dtype = bfloat16: every frozen base weight is bfloat16, the adapter (and head) are
    float32 in the model and on the wire, and the adapter learns."""
    cfg = replace(cfg, dtype="bfloat16")
    run = _learn(topics_corpus, cfg, modules, TrainConfig(local_steps=steps, lr=lr))
    frozen = {
        name: p.dtype
        for name, p in run.model.named_parameters()
        if not p.requires_grad and "lora_" not in name and "classifier" not in name
    }
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert _trainable_dtypes(run.model) == {torch.float32}
    assert run.optimizer_state == {torch.float32}
    wire_state = run.host.get_state(run.spec)
    assert {v.dtype for v in wire_state.values()} == {np.dtype(np.float32)}
    assert run.losses[1] < run.losses[0] / (2 if cfg.task == "classification" else 3)
    assert run.accuracies[1] > run.accuracies[0] + 0.1
    run.host.set_state(run.spec, wire_state)  # loads back exactly as it was read
    assert all(np.array_equal(wire_state[k], v) for k, v in run.host.get_state(run.spec).items())


@pytest.mark.slow  # 95-120 s through flwr run on the loaded 2-core VM
def test_bf16_end_to_end(run_scenario, tiny_config):
    """HetLoRA through flwr run with train.precision = bf16: every client trains under bf16
    autocast, the server evaluates under it, the run learns and exports a float32 adapter."""
    config = {**tiny_config, "num-server-rounds": 2, "train.precision": "bf16"}
    proc, results = run_scenario(config)
    assert len(learned_rounds(proc, results)) == 3
    assert {t.dtype for t in adapter_tensors(results).values()} == {np.dtype(np.float32)}
