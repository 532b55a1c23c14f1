"""What one client update costs: training FLOPs, peak training memory, and the bytes it moves.

Pure functions of the base model's shape (read from its transformers config, no weights) and
of the update (rank, trained blocks, local steps x batch x tokens). They feed the simulated
device clock (:mod:`hetfed.device_clock`) and the budgets derived from a device's memory.

FLOPs count the matrix multiplications (2 per multiply-add, as ``torch.utils.flop_counter``
does; element-wise work is left out). A block is a small data flow of named tensors
(:func:`encoder_block`, :func:`decoder_block`); the backward pass of an operation runs only
where its output needs a gradient, which it does when a trainable LoRA factor lies below it:

- forward: every projection 2 T d_in d_out, every LoRA module 2 T r (d_in + d_out), the two
  attention products 2 T L w each, the head;
- backward: a frozen projection whose input needs a gradient 2 T d_in d_out (the input's
  gradient; no weight gradient), a trainable LoRA module 2 T r (2 d_out + d_in) plus 2 T r d_in
  when its input needs a gradient, a frozen LoRA module 2 T r (d_in + d_out), an attention
  product the same as forward for each operand that needs a gradient; nothing below the lowest
  trained block.

Peak memory = the frozen weights + the LoRA factors (trainable ones four times: parameter,
gradient and AdamW's two moments) + a classifier head the same way + the activations autograd
keeps for the backward pass (each operation's saved inputs, once per tensor) + a causal LM's
vocabulary-wide float32 logits of the scored positions (logits, log-softmax, gradient).

T = batch x tokens per step, L = tokens per sequence, w = the attention width (heads x head
size), r = the client's rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FLOAT32 = 4


@dataclass(frozen=True)
class Op:
    """One operation of a block: ``kind`` on the ``inputs`` tensors, giving tensor ``name`` of
    ``width`` elements per token (an attention map, ``attention=True``: heads x keys per token).
    ``d_in``/``d_out`` are a projection's."""

    kind: str  # linear | product | softmax | dropout | norm | act | mul | add
    name: str
    inputs: tuple[str, ...]
    width: int = 0
    d_in: int = 0
    d_out: int = 0
    attention: bool = False


@dataclass(frozen=True)
class ModelShape:
    """A base model's shape: its block, how many, its attention heads, its head, its frozen
    parameters."""

    family: str  # encoder (BERT-like classifier) | decoder (LLaMA-like causal LM)
    blocks: int
    hidden: int
    heads: int
    ops: tuple[Op, ...]  # one block's data flow, from its input "x" to its output "out"
    head_out: int  # classes (a trained classifier) or the vocabulary (a frozen LM head)
    frozen_parameters: int


@dataclass(frozen=True)
class UpdateShape:
    """One client's local training: its adapter and its work."""

    rank: int
    target_modules: tuple[str, ...]
    trained_blocks: tuple[int, ...]  # the blocks whose LoRA modules it trains
    steps: int
    batch: int
    tokens: int  # per sequence
    scored: int = 1  # positions whose logits a causal LM computes (the answer tokens)


def encoder_block(hidden: int, intermediate: int, dropout: bool) -> tuple[Op, ...]:
    """A BERT layer: self-attention (query, key, value, attention.output.dense) and the MLP
    (intermediate.dense, output.dense), post-norm residuals, dropout in training."""
    h, i = hidden, intermediate

    def drop(name: str, source: str, attention: bool = False) -> tuple[Op, ...]:
        return (Op("dropout", name, (source,), h, attention=attention),) if dropout else ()

    probs, attention_out, mlp_out = ("pd", "ad", "md") if dropout else ("p", "attn", "mlp")
    return (
        Op("linear", "query", ("x",), h, h, h),
        Op("linear", "key", ("x",), h, h, h),
        Op("linear", "value", ("x",), h, h, h),
        Op("product", "s", ("query", "key"), h, attention=True),
        Op("softmax", "p", ("s",), h, attention=True),
        *drop("pd", "p", attention=True),
        Op("product", "c", (probs, "value"), h),
        Op("linear", "attention.output.dense", ("c",), h, h, h),
        *drop("ad", "attention.output.dense"),
        Op("add", "r1", (attention_out if dropout else "attention.output.dense", "x"), h),
        Op("norm", "y", ("r1",), h),
        Op("linear", "intermediate.dense", ("y",), i, h, i),
        Op("act", "g", ("intermediate.dense",), i),
        Op("linear", "output.dense", ("g",), h, i, h),
        *drop("md", "output.dense"),
        Op("add", "r2", (mlp_out if dropout else "output.dense", "y"), h),
        Op("norm", "out", ("r2",), h),
    )


def decoder_block(hidden: int, intermediate: int, width: int, kv_width: int) -> tuple[Op, ...]:
    """A LLaMA layer: pre-norm self-attention (q/k/v/o_proj, grouped key-value heads) and the
    gated MLP (gate/up/down_proj)."""
    h, i = hidden, intermediate
    return (
        Op("norm", "n1", ("x",), h),
        Op("linear", "q_proj", ("n1",), width, h, width),
        Op("linear", "k_proj", ("n1",), kv_width, h, kv_width),
        Op("linear", "v_proj", ("n1",), kv_width, h, kv_width),
        Op("product", "s", ("q_proj", "k_proj"), width, attention=True),
        Op("softmax", "p", ("s",), width, attention=True),
        Op("product", "c", ("p", "v_proj"), width),
        Op("linear", "o_proj", ("c",), h, width, h),
        Op("add", "y", ("o_proj", "x"), h),
        Op("norm", "n2", ("y",), h),
        Op("linear", "gate_proj", ("n2",), i, h, i),
        Op("linear", "up_proj", ("n2",), i, h, i),
        Op("act", "a", ("gate_proj",), i),
        Op("mul", "m", ("a", "up_proj"), i),
        Op("linear", "down_proj", ("m",), h, i, h),
        Op("add", "out", ("down_proj", "y"), h),
    )


ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta")


def model_shape(config: Any, num_labels: int, frozen_parameters: int) -> ModelShape:
    """The shape of a transformers config: a BERT-like encoder (with a classifier) or a
    LLaMA-like causal LM."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    if config.model_type in ENCODERS:
        dropout = max(config.hidden_dropout_prob, config.attention_probs_dropout_prob) > 0
        ops = encoder_block(h, i, dropout)
        return ModelShape("encoder", layers, h, heads, ops, num_labels, frozen_parameters)
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    ops = decoder_block(h, i, heads * head_dim, kv_heads * head_dim)
    return ModelShape("decoder", layers, h, heads, ops, config.vocab_size, frozen_parameters)


def targeted(module: str, target_modules: Iterable[str]) -> bool:
    """Whether peft puts LoRA on ``module`` (its name, or its last parts, is a target)."""
    return any(module == t or module.endswith("." + t) for t in target_modules)


@dataclass
class _BlockCost:
    flops: float = 0.0  # per token, forward and backward
    saved: float = 0.0  # bytes per token kept for the backward pass
    lora: float = 0.0  # LoRA parameters
    trainable: float = 0.0  # of which trained


def _block_cost(
    shape: ModelShape, update: UpdateShape, grad_in: bool, trained: bool
) -> tuple[_BlockCost, bool]:
    """One block's cost per token, and whether its output needs a gradient."""
    cost, r, seq = _BlockCost(), update.rank, update.tokens
    needs = {"x": grad_in}  # tensor -> whether it needs a gradient
    widths = {"x": shape.hidden} | {op.name: _elements(op, shape, seq) for op in shape.ops}
    saved: dict[str, float] = {}  # tensor -> bytes per token, each kept once
    for op in shape.ops:
        grads = [needs[name] for name in op.inputs]
        lora = op.kind == "linear" and targeted(op.name, update.target_modules)
        needs[op.name] = any(grads) or (lora and trained)
        if op.kind == "linear":
            cost.flops += 2 * op.d_in * op.d_out * (1 + (needs[op.name] and grads[0]))
            if lora:
                cost.lora += r * (op.d_in + op.d_out)
                cost.flops += 2 * r * (op.d_in + op.d_out)  # forward
                if trained:  # both weight gradients, through B
                    cost.trainable += r * (op.d_in + op.d_out)
                    cost.flops += 2 * r * (2 * op.d_out + op.d_in)
                    saved |= {op.inputs[0]: widths[op.inputs[0]], f"{op.name}.A": r}
                if grads[0]:  # the input's gradient, through B then A
                    cost.flops += 2 * r * (op.d_in + (0 if trained else op.d_out))
        elif op.kind == "product":
            per_operand = 2 * seq * op.width
            cost.flops += per_operand * (1 + sum(grads))
            if needs[op.name]:
                saved |= {name: widths[name] for name in op.inputs}
        elif needs[op.name] and op.kind == "softmax":
            saved[op.name] = widths[op.name]
        elif needs[op.name] and op.kind == "dropout":
            saved[op.name] = widths[op.name] / FLOAT32  # a one-byte mask
        elif needs[op.name] and op.kind in ("norm", "act", "mul"):
            saved |= {name: widths[name] for name in op.inputs}
    cost.saved = FLOAT32 * sum(saved.values())
    return cost, needs["out"]


def _elements(op: Op, shape: ModelShape, seq: int) -> int:
    """Elements per token of an operation's output (attention maps: heads x keys)."""
    return shape.heads * seq if op.attention else op.width


@dataclass(frozen=True)
class StepCost:
    """One local step: its FLOPs and the bytes of its training state."""

    flops: float
    activations: float  # bytes autograd keeps for the backward pass
    adapter: float  # LoRA factors; trained ones with gradient and AdamW moments
    head: float  # the classifier with its training state, or the LM head's logits


def step_cost(shape: ModelShape, update: UpdateShape) -> StepCost:
    """The FLOPs and memory of one local step (see the module)."""
    tokens = update.batch * update.tokens
    grad, flops, activations, adapter = False, 0.0, 0.0, 0.0
    for block in range(shape.blocks):
        cost, grad = _block_cost(shape, update, grad, block in update.trained_blocks)
        flops += tokens * cost.flops
        activations += tokens * cost.saved
        adapter += FLOAT32 * (cost.lora + 3 * cost.trainable)
    weights = shape.hidden * shape.head_out
    if shape.family == "encoder":  # a trained classifier on the pooled hidden states
        flops += update.batch * 2 * weights * (3 if grad else 2)
        head = FLOAT32 * 4 * (weights + shape.head_out)
        activations += FLOAT32 * update.batch * shape.hidden
    else:  # the frozen LM head on the scored positions: logits, log-softmax, gradient
        positions = update.batch * update.scored
        flops += positions * 2 * weights * (2 if grad else 1)
        head = FLOAT32 * 3 * positions * shape.head_out
    return StepCost(flops, activations, adapter, head)


def training_flops(shape: ModelShape, update: UpdateShape) -> float:
    """FLOPs of the client's local training: every step, forward and backward."""
    return update.steps * step_cost(shape, update).flops


def peak_memory_bytes(shape: ModelShape, update: UpdateShape, weight_bytes: int = FLOAT32):
    """Peak bytes of local training: the frozen weights (``weight_bytes`` each) and one step's
    training state (:class:`StepCost`)."""
    step = step_cost(shape, update)
    return shape.frozen_parameters * weight_bytes + step.adapter + step.head + step.activations


def clients_per_pack(shape: ModelShape, update: UpdateShape, free_bytes: float, most: int) -> int:
    """How many clients of local work ``update`` a packed trainer fits beside its one base
    (already loaded) in ``free_bytes``: each brings one step's training state
    (:class:`StepCost`: activations, adapter, head); at least 1, at most ``most``."""
    step = step_cost(shape, update)
    per_client = step.activations + step.adapter + step.head
    return max(1, min(most, int(free_bytes // per_client)))


def adapter_bytes(shape: ModelShape, rank: int, target_modules: Iterable[str], blocks: int):
    """Bytes of a rank-``rank`` adapter's LoRA factors over ``blocks`` blocks, float32."""
    per_block = sum(
        op.d_in + op.d_out
        for op in shape.ops
        if op.kind == "linear" and targeted(op.name, target_modules)
    )
    return FLOAT32 * rank * per_block * blocks
