"""Local training and evaluation of a classifier with its active LoRA adapter."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hetfed.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """A client's local work per round and the evaluation batch size."""

    local_steps: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 64

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


@dataclass(frozen=True)
class Encoded:
    """A tokenized split, padded to its longest example (at most ``model.max-length``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode(texts: list[str], labels: list[int], tokenizer, max_length: int) -> Encoded:
    batch = tokenizer(
        texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    return Encoded(batch["input_ids"], batch["attention_mask"], torch.tensor(labels))


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


def train_steps(
    model: nn.Module,
    data: Encoded,
    cfg: TrainConfig,
    seed: int,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` AdamW steps on seeded shuffles of ``data``.

    ``penalty`` (for example HetLoRA's rank-tail regulariser) is added to every step's loss.
    Returns the mean task loss over the steps.
    """
    start = time.perf_counter()
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.randperm(len(data), generator=generator)
    cursor, total_loss, seen = 0, 0.0, 0
    with seeded_torch(seed):  # dropout draws depend on the seed, not on the process's history
        model.train()
        for _ in range(cfg.local_steps):
            if cursor >= len(order):
                order, cursor = torch.randperm(len(data), generator=generator), 0
            idx = order[cursor : cursor + cfg.batch_size]
            cursor += cfg.batch_size
            mask = data.attention_mask[idx]
            width = int(mask.sum(1).max())  # drop padding columns this batch does not need
            logits = model(
                input_ids=data.input_ids[idx, :width].to(device),
                attention_mask=mask[:, :width].to(device),
            )
            loss = nn.functional.cross_entropy(logits, data.labels[idx].to(device))
            objective = loss + penalty() if penalty is not None else loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total_loss += float(loss.detach())
            seen += len(idx)
        model.eval()
    return TrainResult(
        total_loss / cfg.local_steps, cfg.local_steps, seen, time.perf_counter() - start
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data``."""
    model.eval()
    device = model_device(model)
    correct, loss_sum = 0, 0.0
    for begin in range(0, len(data), batch_size):
        mask = data.attention_mask[begin : begin + batch_size]
        width = int(mask.sum(1).max())
        logits = model(
            input_ids=data.input_ids[begin : begin + batch_size, :width].to(device),
            attention_mask=mask[:, :width].to(device),
        )
        labels = data.labels[begin : begin + batch_size].to(device)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / max(len(data), 1), loss_sum / max(len(data), 1)
