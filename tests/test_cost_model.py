"""The cost model (hetfed.cost_model) against torch's own FLOP counter and a measured peak.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around one training step (forward and
backward) of the real model with its LoRA adapter, within 10%. Memory: the frozen weights and
buffers held before the step plus the peak of the allocator's "Total Allocated" during one
step with AdamW (forward, backward, optimizer step), traced by the PyTorch profiler
(``profile_memory=True``), within 25%. The tiny LLaMA runs with eager attention: torch's CPU
flash-attention kernel, its default, is not counted by FlopCounterMode.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.cost_model import (
    UpdateShape,
    adapter_bytes,
    peak_memory_bytes,
    step_cost,
    training_flops,
)
from hetfed.models import INSTRUCTION, ModelConfig, build_model, cost_shape
from hetfed.training import Encoded, task_forward, task_loss

MINILM = ModelConfig(name="all-MiniLM-L6-v2", max_length=64)
LLAMA = ModelConfig(name="tiny-random-llama", task=INSTRUCTION, max_length=40)
LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj")
CASES = [  # model, LoRA modules, rank, trained blocks (None: all), batch, tokens
    (MINILM, ("query", "value"), 8, None, 16, 32),
    (MINILM, ("query", "value"), 2, (4, 5), 16, 32),
    (MINILM, ("query", "value"), 16, (0, 1), 8, 64),
    (LLAMA, LLAMA_ALL, 8, None, 8, 40),
    (LLAMA, ("q_proj", "v_proj"), 4, (1,), 8, 40),
]
SCORED = 3  # answer tokens of the causal LM's batch


def measured_step(cfg, modules, rank, blocks, batch, tokens, tmp_path):
    """(FLOPs counted by torch, peak bytes) of one real training step."""
    torch.manual_seed(0)
    model, _ = build_model(cfg, 5, seed=0)
    (model if cfg.task == INSTRUCTION else model.backbone).config._attn_implementation = "eager"
    host = AdapterHost(model)
    spec = LoraSpec(rank, 16.0, modules)
    peft_model = host.set_state(spec, host.initial_state(spec, 0))
    ids = torch.randint(5, 1000, (batch, tokens))
    if cfg.task == INSTRUCTION:
        labels = torch.full((batch, tokens), -100)
        labels[:, -SCORED:] = ids[:, -SCORED:]
    else:
        labels = torch.randint(0, 5, (batch,))
    data, idx = Encoded(ids, torch.ones_like(ids), labels), torch.arange(batch)
    with host.train_only_layers(spec, blocks):
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
        peft_model.train()
        with FlopCounterMode(display=False) as counter:
            task_loss(*task_forward(peft_model, data, idx)).backward()
        optimizer.zero_grad(set_to_none=True)
        held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            task_loss(*task_forward(peft_model, data, idx)).backward()
            optimizer.step()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    step_peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    return counter.get_total_flops(), held + step_peak


@pytest.mark.parametrize(("cfg", "modules", "rank", "blocks", "batch", "tokens"), CASES)
def test_flops_and_peak_memory_match_torch(cfg, modules, rank, blocks, batch, tokens, tmp_path):
    flops, peak = measured_step(cfg, modules, rank, blocks, batch, tokens, tmp_path)
    shape = cost_shape(cfg, 5)
    trained = tuple(range(shape.blocks)) if blocks is None else blocks
    update = UpdateShape(rank, modules, trained, 1, batch, tokens, scored=SCORED + 1)
    assert step_cost(shape, update).flops == pytest.approx(flops, rel=0.10)
    assert peak_memory_bytes(shape, update) == pytest.approx(peak, rel=0.25)


def test_what_each_budget_saves():
    """Rank adds LoRA FLOPs and bytes, linearly; training only the top blocks saves the
    backward pass below them; steps multiply FLOPs, not memory."""
    shape = cost_shape(MINILM, 5)
    top, every = (5,), tuple(range(6))

    def update(rank, blocks=every, steps=10):
        return UpdateShape(rank, ("query", "value"), blocks, steps, 16, 32)

    lora_per_rank = training_flops(shape, update(2)) - training_flops(shape, update(1))
    assert training_flops(shape, update(9)) - training_flops(shape, update(1)) == pytest.approx(
        8 * lora_per_rank
    )
    # the forward pass stays whole; the backward of the five blocks below is saved
    assert training_flops(shape, update(8, top)) < 0.6 * training_flops(shape, update(8))
    assert training_flops(shape, update(8, steps=20)) == 2 * training_flops(shape, update(8))
    assert peak_memory_bytes(shape, update(8, steps=20)) == peak_memory_bytes(shape, update(8))
    assert peak_memory_bytes(shape, update(8, top)) < peak_memory_bytes(shape, update(8))
    # query and value are 384 x 384: a rank-r adapter holds r (384 + 384) floats per module
    assert adapter_bytes(shape, 8, ("query", "value"), 6) == 4 * 8 * 2 * 768 * 6
