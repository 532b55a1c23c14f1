"""Several clients' local training in one batched forward and backward pass over one frozen base.

A pack holds k clients, each in a slot: its own peft adapter at its own rank (a
:class:`~hetfed.adapters.LoraSpec` with ``slot``), loaded with the arrays it was sent, with its
untrained layers and factors frozen, its own AdamW state, its own batch order
(:class:`~hetfed.training.BatchOrder` from its seed), its own number of local steps and its own
loss penalty. Each step stacks the active clients' batches (each padded to the longest, on the
side its task pads) and runs the base once; peft's mixed-batch forward (``adapter_names``, one
per row) applies each row's adapter and head to that row only, so client i's gradient is the
gradient of its own loss: the sum of the clients' losses is backpropagated once, and each
client's optimizer steps its own parameters. A client whose local steps are done leaves the
stack. Mixed ranks need no padding: peft computes each adapter on its own rows.

Randomness is per client, as in :func:`~hetfed.training.train_steps`: the batch order from the
client's seed, and LoRA dropout (``lora.dropout`` > 0) from a generator of its own on the
dropout stream of that seed (:func:`hetfed.seeds.dropout_seed`), drawn over the client's own
columns only (:class:`ClientDropout`). On the CPU a packed
client therefore trains exactly as it would alone, up to float rounding (the base computes on a
wider batch). The frozen base runs without its dropout (``train.base-dropout = false``): a
shared forward pass cannot give each client its own base dropout draws.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from hetfed import seeds
from hetfed.adapters import LoraSpec
from hetfed.training import (
    Batch,
    BatchOrder,
    Encoded,
    TrainConfig,
    TrainResult,
    autocast,
    batch_forward,
    loss_scaler,
    model_device,
    task_loss,
    train_mode,
)


class ClientDropout(nn.Module):
    """LoRA dropout of one packed client: its mask drawn from the client's own generator over
    the client's own columns (``columns``), exactly as ``nn.Dropout`` draws it for the client
    alone on the CPU; the columns padded for other clients pass through."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.p, self.generator = p, generator
        self.columns = slice(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        noise = torch.empty_like(x[:, self.columns].contiguous())
        noise.bernoulli_(1 - self.p, generator=self.generator).div_(1 - self.p)
        mask = torch.ones_like(x)
        mask[:, self.columns] = noise
        return x * mask


@dataclass
class PackedClient:
    """One client of a pack: its slot's adapter (loaded), data, seed, steps and penalty."""

    spec: LoraSpec
    data: Encoded
    seed: int
    steps: int
    penalty: Callable[[], torch.Tensor] | None = None


@dataclass
class _Progress:
    """A packed client's training state between steps."""

    client: PackedClient
    batches: BatchOrder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dropout: ClientDropout | None
    total_loss: float = 0.0
    seen: int = 0
    batch: Batch | None = field(default=None, repr=False)


def _slot_parameters(model: nn.Module, spec: LoraSpec) -> list[nn.Parameter]:
    """The trainable parameters of ``spec``'s adapter (its LoRA factors and head copy)."""
    tag = f".{spec.name}."
    return [p for name, p in model.named_parameters() if p.requires_grad and tag in name]


def _client_dropout(model: nn.Module, client: PackedClient, device: torch.device):
    """Give every LoRA layer of the client's adapter the client's own dropout (None at p = 0)."""
    if client.spec.dropout == 0:
        return None
    generator = torch.Generator(device=device).manual_seed(seeds.dropout_seed(client.seed))
    dropout = ClientDropout(client.spec.dropout, generator)
    for module in model.modules():
        if isinstance(module, LoraLayer) and client.spec.name in module.lora_dropout:
            module.lora_dropout[client.spec.name] = dropout
    return dropout


@contextmanager
def rows_adapters(model: nn.Module, adapter_names: list[str]) -> Iterator[None]:
    """Route row i of the next forward passes through adapter ``adapter_names[i]``: peft's
    mixed-batch forward, given to every LoRA layer and head copy (peft refuses ``adapter_names``
    on a model in training mode, so the argument is passed the way peft passes it itself)."""

    def pass_names(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [
        module.register_forward_pre_hook(pass_names, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, LoraLayer | AuxiliaryTrainingWrapper)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def train_packed(
    model: PeftModel, clients: list[PackedClient], cfg: TrainConfig
) -> list[TrainResult]:
    """Train ``clients`` together for their own number of steps (see the module); the adapters
    are loaded and made trainable together (:meth:`~hetfed.adapters.AdapterHost.train_together`)
    with their frozen parts frozen. Returns each client's mean task loss over its steps."""
    start = time.perf_counter()
    device = model_device(model)
    progress = []
    for client in clients:
        params = _slot_parameters(model, client.spec)
        progress.append(
            _Progress(
                client,
                BatchOrder(len(client.data), cfg.batch_size, client.seed),
                torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
                loss_scaler(model, cfg.precision),
                _client_dropout(model, client, device),
            )
        )
    train_mode(model, base_dropout=False)
    try:
        for step in range(max(client.steps for client in clients)):
            _packed_step(model, [p for p in progress if p.client.steps > step], cfg, device)
    finally:
        model.eval()
    seconds = time.perf_counter() - start
    return [
        TrainResult(p.total_loss / p.client.steps, p.client.steps, p.seen, seconds)
        for p in progress
    ]


def _packed_step(
    model: nn.Module, active: list[_Progress], cfg: TrainConfig, device: torch.device
) -> None:
    """One local step of every active client, in one forward and one backward pass."""
    for p in active:
        p.batch = Batch.of(p.client.data, p.batches.next())
    length = max(p.batch.length for p in active)
    padded = [p.batch.padded_to(length) for p in active]
    names = [p.client.spec.name for p in active for _ in range(len(p.batch.labels))]
    scored = [b.scored for b in padded if b.scored is not None]
    stacked = Batch(
        torch.cat([b.input_ids for b in padded]),
        torch.cat([b.attention_mask for b in padded]),
        torch.cat([b.labels for b in padded]),
        max(scored) if scored else None,
    )
    for p in active:
        if p.dropout is not None:
            p.dropout.columns = p.batch.columns(length)
    objective = torch.zeros((), device=device)
    losses = []
    with rows_adapters(model, names), autocast(cfg.precision, device):
        logits, labels = batch_forward(model, stacked)
        first = 0
        for p in active:
            rows = slice(first, first + len(p.batch.labels))
            first = rows.stop
            own_logits, own_labels = logits[rows], labels[rows]
            if p.batch.scored is not None:  # its own scored positions, the last ones
                own_logits = own_logits[:, -p.batch.scored :]
                own_labels = own_labels[:, -p.batch.scored :]
            losses.append(task_loss(own_logits, own_labels))
    for p, loss in zip(active, losses, strict=True):
        penalty = p.client.penalty
        own = loss + penalty() if penalty is not None else loss
        objective = objective + p.scaler.scale(own)
        p.optimizer.zero_grad(set_to_none=True)
    objective.backward()
    for p, loss in zip(active, losses, strict=True):
        p.scaler.step(p.optimizer)  # skipped on inf/nan gradients of a too-large fp16 scale
        p.scaler.update()
        p.total_loss += float(loss.detach())
        p.seen += len(p.batch.labels)
