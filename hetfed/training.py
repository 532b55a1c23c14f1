"""Local training and evaluation of a model with its active LoRA adapter.

One loop serves both tasks: the labels of an :class:`Encoded` split are one class per example
(classification) or next-token targets per position (instruction, :mod:`hetfed.instructions`),
and :func:`task_loss` reads which from their shape.

``train.precision`` runs the forward and backward passes of training and evaluation under
autocast (``bf16``, ``fp16``); the trainable parameters (LoRA factors, the head), their
gradients and the optimizer state stay float32, the loss is taken in float32, and ``fp16`` (or a
float16 base) scales the loss (:class:`torch.amp.GradScaler`) so that small gradients survive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hetfed import seeds
from hetfed.errors import ConfigError
from hetfed.instructions import IGNORE, encode_generation, encode_instructions
from hetfed.models import GENERATION, INSTRUCTION, ModelConfig

# train.precision: the autocast dtype of training and evaluation (None: none, float32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """A client's local work per round, the evaluation batch size, and the precision both
    compute in."""

    local_steps: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    precision: str = "fp32"
    # the frozen base's own dropout layers while a client trains (false: only lora.dropout);
    # packed training (simulation.packing) needs false, see docs/packing.md
    base_dropout: bool = True

    def __post_init__(self) -> None:
        for key, value in (
            ("train.local-steps", self.local_steps),
            ("train.batch-size", self.batch_size),
            ("train.eval-batch-size", self.eval_batch_size),
        ):
            if value < 1:
                raise ConfigError(key, value, "an integer >= 1")
        if not 0 < self.lr < 1:
            raise ConfigError("train.lr", self.lr, "a number in (0, 1)")
        if self.weight_decay < 0:
            raise ConfigError("train.weight-decay", self.weight_decay, "a number >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError("train.precision", self.precision, " | ".join(PRECISIONS))


def require_precision_runs(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, before any training, a precision this device cannot compute in: fp16 autocast
    and its loss scaling need CUDA (a CPU has no float16 arithmetic to gain from; bf16 runs
    there), bf16 a GPU that supports it."""
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "train.precision",
            cfg.precision,
            f"fp32 or bf16 on this {device.type} device: fp16 needs a CUDA GPU",
        )
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "train.precision",
            cfg.precision,
            f"fp32 or fp16: {torch.cuda.get_device_name(device)} does not support bfloat16",
        )


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast of ``precision`` on ``device`` (nothing for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_scaler(model: nn.Module, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled where float16 computes (``fp16``, or a float16 base): its
    small gradients would underflow to zero unscaled. Disabled, it passes everything through."""
    fp16 = precision == "fp16" or any(p.dtype == torch.float16 for p in model.parameters())
    return torch.amp.GradScaler(model_device(model).type, enabled=fp16)


@dataclass(frozen=True)
class Encoded:
    """A tokenized split, padded to its longest example (at most ``model.max-length``).

    ``labels``: a class per example, shape (N,), with right padding; or next-token targets,
    shape (N, L), :data:`~hetfed.instructions.IGNORE` outside the answers, with left padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode(texts: list[str], labels: list[int], tokenizer, max_length: int) -> Encoded:
    """A classification split: texts truncated to ``max_length`` tokens, a class each."""
    batch = tokenizer(
        texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    return Encoded(batch["input_ids"], batch["attention_mask"], torch.tensor(labels))


def encode_for_task(
    cfg: ModelConfig,
    texts: list[str],
    labels: list[int],
    label_names: list[str],
    tokenizer,
    targets: list[str] | None = None,
) -> Encoded:
    """A split encoded for ``cfg.task``: classes, instruction prompts with the labels' names as
    answers, or generation prompts with their ``targets``."""
    if cfg.task == GENERATION:
        return Encoded(
            *encode_generation(
                texts, targets, tokenizer, cfg.max_length, cfg.prompt, cfg.max_new_tokens
            )
        )
    if cfg.task == INSTRUCTION:
        return Encoded(
            *encode_instructions(texts, labels, label_names, tokenizer, cfg.max_length, cfg.prompt)
        )
    return encode(texts, labels, tokenizer, cfg.max_length)


def encode_split(
    cfg: ModelConfig,
    dataset: Any,
    label_names: list[str],
    tokenizer,
    labels: list[int] | None = None,
) -> Encoded:
    """A split of :mod:`hetfed.data` (``text``, ``label`` and, for pairs, ``target`` columns)
    encoded for ``cfg.task``; ``labels`` replaces the split's own label ids."""
    targets = list(dataset["target"]) if "target" in dataset.column_names else None
    labels = list(dataset["label"]) if labels is None else labels
    return encode_for_task(cfg, list(dataset["text"]), labels, label_names, tokenizer, targets)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy: of class logits (N, K) against classes (N,), or of next-token logits
    (N, L, V) against targets (N, L), where position t-1 predicts ``labels[:, t]`` and
    :data:`~hetfed.instructions.IGNORE` positions count nothing (mean: per answer token).
    Taken in float32 whatever the logits' dtype."""
    logits = logits.float()
    if labels.dim() == 1:
        return nn.functional.cross_entropy(logits, labels, reduction=reduction)
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE,
        reduction=reduction,
    )


@dataclass(frozen=True)
class Batch:
    """Some examples of a split, laid out for one forward pass, without the padding columns
    they do not need.

    Classification (right-padded): ``labels`` a class per example, ``scored`` None.
    Instruction and generation (left-padded, answers end in the last column): ``labels`` the
    next-token targets, and ``scored`` the last positions whose logits are computed, from the
    one before the earliest answer token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    scored: int | None = None

    @classmethod
    def of(cls, data: Encoded, idx: torch.Tensor | slice) -> Batch:
        mask, labels = data.attention_mask[idx], data.labels[idx]
        length = int(mask.sum(1).max())
        if labels.dim() == 1:
            return cls(data.input_ids[idx, :length], mask[:, :length], labels)
        labels = labels[:, -length:]
        scored = length - int((labels != IGNORE).any(0).int().argmax()) + 1
        return cls(data.input_ids[idx, -length:], mask[:, -length:], labels, scored)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def columns(self, length: int) -> slice:
        """Where this batch's own columns sit once it is padded to ``length`` columns."""
        return slice(0, self.length) if self.scored is None else slice(length - self.length, None)

    def padded_to(self, length: int) -> Batch:
        """The same examples padded to ``length`` columns, on the side the task pads (the added
        columns are masked out and carry no targets)."""
        extra = length - self.length
        if extra == 0:
            return self
        side = (0, extra) if self.scored is None else (extra, 0)
        pad = nn.functional.pad
        labels = self.labels
        if self.scored is not None:
            labels = pad(labels, side, value=IGNORE)
        return Batch(pad(self.input_ids, side), pad(self.attention_mask, side), labels, self.scored)


def batch_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``model`` on ``batch`` and the labels they are scored against, on the model's
    device.

    Classification: class logits (n, K) and classes (n,). Instruction and generation:
    next-token logits of the ``scored`` last positions only, (n, P, V), and the targets of those
    P positions (n, P); position ids count real tokens only, as if nothing were padded.
    """
    device = model_device(model)
    mask = batch.attention_mask
    if batch.scored is None:
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=mask.to(device))
        return logits, batch.labels.to(device)
    output = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(device),
        logits_to_keep=batch.scored,
    )
    return output.logits, batch.labels[:, -batch.scored :].to(device)


def task_forward(
    model: nn.Module, data: Encoded, idx: torch.Tensor | slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``model`` on the examples ``idx`` of ``data`` and their labels
    (:func:`batch_forward` of :meth:`Batch.of`)."""
    return batch_forward(model, Batch.of(data, idx))


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    examples_seen: int
    seconds: float


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded by ``seed`` (dropout, fresh weights), and
    restore the RNG afterwards: a client's training is then the same in every process."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are; batches are moved there (a no-op on the CPU)."""
    return next(model.parameters()).device


class BatchOrder:
    """A client's batches: shuffles of its ``size`` examples, one pass after another, from the
    batch-order stream of its ``seed``."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seeds.batch_order_seed(seed))
        self.order, self.cursor = torch.randperm(size, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.cursor >= len(self.order):
            self.order, self.cursor = torch.randperm(self.size, generator=self.generator), 0
        idx = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx


def train_mode(model: nn.Module, base_dropout: bool) -> None:
    """Put ``model`` in training mode: every module, or (``base_dropout`` false) only the LoRA
    layers' own dropout (peft's ``lora_dropout``), the frozen base computing as in evaluation."""
    model.train(base_dropout)
    if not base_dropout:
        for name, module in model.named_modules():
            if name.endswith(".lora_dropout"):
                module.train()


def train_steps(
    model: nn.Module,
    data: Encoded,
    cfg: TrainConfig,
    seed: int,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` AdamW steps on seeded shuffles of ``data``, the forward and
    backward passes in ``cfg.precision``.

    ``penalty`` (for example HetLoRA's rank-tail regulariser) is added to every step's loss.
    Returns the mean task loss over the steps.
    """
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = loss_scaler(model, cfg.precision)
    device = model_device(model)
    batches = BatchOrder(len(data), cfg.batch_size, seed)
    total_loss, seen = 0.0, 0
    # dropout draws depend on the seed, not on the process's history
    with seeded_torch(seeds.dropout_seed(seed)):
        train_mode(model, cfg.base_dropout)
        for _ in range(cfg.local_steps):
            idx = batches.next()
            with autocast(cfg.precision, device):
                loss = task_loss(*task_forward(model, data, idx))
            objective = loss + penalty() if penalty is not None else loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            scaler.step(optimizer)  # skipped on inf/nan gradients of a too-large fp16 scale
            scaler.update()
            total_loss += float(loss.detach())
            seen += len(idx)
        model.eval()
    return TrainResult(
        total_loss / cfg.local_steps, cfg.local_steps, seen, time.perf_counter() - start
    )


@dataclass(frozen=True)
class Scores:
    """An evaluation, overall and per example: whether each example was right, its summed
    cross-entropy and the targets it was taken over (one for a class, the answer tokens for
    the causal tasks). ``accuracy`` and ``loss`` are the overall figures (loss per target)."""

    accuracy: float
    loss: float
    correct: tuple[bool, ...]
    loss_sums: tuple[float, ...]
    targets: tuple[int, ...]


@torch.no_grad()
def score(model: nn.Module, data: Encoded, batch_size: int, precision: str = "fp32") -> Scores:
    """Accuracy and mean cross-entropy of ``model`` on ``data``, and each example's, the
    forward passes in ``precision``.

    Classification: the argmax class is the label; loss per example. Instruction: every answer
    token is the argmax next token (greedy decoding yields the answer); loss per answer token.
    """
    model.eval()
    device = model_device(model)
    loss_sum = 0.0  # summed a batch at a time, as the overall loss always was
    right: list[bool] = []
    sums: list[float] = []
    counts: list[int] = []
    for begin in range(0, len(data), batch_size):
        with autocast(precision, device):
            logits, labels = task_forward(model, data, slice(begin, begin + batch_size))
        loss_sum += float(task_loss(logits, labels, reduction="sum"))
        per_target = task_loss(logits, labels, reduction="none")
        if labels.dim() == 1:
            hits = logits.argmax(-1) == labels
            sums += per_target.tolist()
            counts += [1] * len(labels)
        else:
            targets = labels[:, 1:]
            in_answer = targets != IGNORE
            hits = ((logits[:, :-1].argmax(-1) == targets) | ~in_answer).all(1)
            sums += per_target.view(len(labels), -1).sum(1).tolist()
            counts += in_answer.sum(1).tolist()
        right += hits.tolist()
    accuracy, loss = sum(right) / max(len(data), 1), loss_sum / max(sum(counts), 1)
    return Scores(accuracy, loss, tuple(right), tuple(sums), tuple(counts))


def evaluate(
    model: nn.Module, data: Encoded, batch_size: int, precision: str = "fp32"
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (:func:`score`)."""
    scores = score(model, data, batch_size, precision)
    return scores.accuracy, scores.loss
