"""Deep mutual learning of several adapters of one base model on a public split (HeLoRA-KD).

Fan et al., "HeLoRA: LoRA-heterogeneous Federated Fine-tuning for Foundation Models", ACM TOIT
25(2), 2025. Each group model m is a named peft adapter on one :class:`~hetfed.adapters.
AdapterHost`; with z_m(x) its logits:

- ``ensemble`` [code]: L_m = T^2 KL(softmax(z_bar / T) || softmax(z_m / T)), z_bar the (detached)
  mean of the group models' logits;
- ``pairwise`` [choice]: classic deep mutual learning,
  L_m = T^2 / (M - 1) sum_{j != m} KL(softmax(z_j / T) || softmax(z_m / T)) + CE(z_m, y).

Plain functions on a host and a tokenized split, next to :mod:`hetfed.training`; the strategy
(:mod:`strategies.helora_kd`) only calls :func:`mutual_learning`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hetfed import seeds
from hetfed.adapter_state import State
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.training import Encoded, seeded_torch, task_forward

DISTILLATIONS = ("ensemble", "pairwise")


def soft_kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over examples of KL(softmax(target / T) || softmax(logits / T)).

    Gradients flow into ``logits`` only when ``target_logits`` is detached by the caller.
    """
    log_q = nn.functional.log_softmax(logits / temperature, dim=-1)
    log_p = nn.functional.log_softmax(target_logits / temperature, dim=-1)
    return nn.functional.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def ensemble_loss(
    logits: torch.Tensor, all_logits: list[torch.Tensor], temperature: float
) -> torch.Tensor:
    """HeLoRA-KD's loss of one group model [code]: T^2 KL(softmax(z_bar/T) || softmax(z_m/T)),
    z_bar = mean over the groups of their (detached) logits, the student's own included."""
    target = torch.stack([z.detach() for z in all_logits]).mean(0)
    return temperature**2 * soft_kl(target, logits, temperature)


def pairwise_loss(
    logits: torch.Tensor,
    peer_logits: list[torch.Tensor],
    labels: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Classic deep mutual learning [choice]: T^2 times the mean over peers j of
    KL(softmax(z_j/T) || softmax(z_m/T)), plus CE(z_m, y) when ``labels`` are given."""
    loss = logits.new_zeros(())
    if peer_logits:
        kls = [soft_kl(z.detach(), logits, temperature) for z in peer_logits]
        loss = loss + temperature**2 * torch.stack(kls).mean()
    if labels is not None:
        loss = loss + nn.functional.cross_entropy(logits, labels)
    return loss


def _forward(model: nn.Module, data: Encoded, idx: torch.Tensor) -> torch.Tensor:
    return task_forward(model, data, idx)[0]


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, batch_size: int = 64) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on every example of ``data``, in order."""
    model.eval()
    chunks = [
        _forward(model, data, torch.arange(begin, min(begin + batch_size, len(data))))
        for begin in range(0, len(data), batch_size)
    ]
    return torch.cat(chunks)


def group_divergence(logits: list[torch.Tensor], temperature: float) -> tuple[list[float], float]:
    """How far the group models disagree on one split.

    Returns, per group m, KL(softmax(z_bar/T) || softmax(z_m/T)) averaged over the examples (the
    ensemble objective without T^2), and the mean over ordered pairs m != j of
    KL(softmax(z_j/T) || softmax(z_m/T)) (0 for a single group).
    """
    target = torch.stack(logits).mean(0)
    to_ensemble = [float(soft_kl(target, z, temperature)) for z in logits]
    pairs = [
        float(soft_kl(zj, zm, temperature))
        for m, zm in enumerate(logits)
        for j, zj in enumerate(logits)
        if j != m
    ]
    return to_ensemble, float(np.mean(pairs)) if pairs else 0.0


@dataclass
class DistillResult:
    """The distilled groups' arrays and how much the group models disagreed before and after."""

    states: dict[Any, State]
    kl_before: dict[Any, float]  # per group: KL(softmax(z_bar/T) || softmax(z_m/T)) on the split
    kl_after: dict[Any, float]
    pairwise_before: float  # mean KL between two group models, over ordered pairs
    pairwise_after: float
    loss: float  # mean training objective over all steps and groups
    steps: int  # optimizer steps per group
    seconds: float = 0.0


def mutual_learning(
    host: AdapterHost,
    groups: dict[Any, tuple[LoraSpec, State]],
    data: Encoded,
    *,
    mode: str = "ensemble",
    temperature: float = 1.0,
    lr: float = 5e-5,
    epochs: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    weight_decay: float = 0.0,
    eval_batch_size: int = 64,
) -> DistillResult:
    """Deep mutual learning of the group models (named peft adapters on ``host``) on ``data``.

    Each epoch visits ``data`` in a seeded random order in batches of ``batch_size``. Per batch,
    every group's logits z_m are first computed with the current weights (eval mode, no
    gradient); then each group model m, in train mode, takes one AdamW step (one optimizer per
    group, fresh per call) on

    - ``mode="ensemble"`` [code]: T^2 KL(softmax(z_bar/T) || softmax(z_m/T)), z_bar = mean_m z_m;
    - ``mode="pairwise"`` [choice]: T^2 mean_{j != m} KL(softmax(z_j/T) || softmax(z_m/T))
      + CE(z_m, y) (classic DML; the cross-entropy when every label of ``data`` is >= 0).

    All group models see the same targets of a batch (a simultaneous update). Returns the new
    arrays of every group (same keys and shapes) and the disagreement of the groups on ``data``
    before and after (:func:`group_divergence`). Holds ``host.lock`` throughout; the base model
    is used without base-weight deltas.
    """
    if mode not in DISTILLATIONS:
        raise ValueError(f"mode {mode!r}; allowed: {', '.join(DISTILLATIONS)}")
    start = time.perf_counter()
    keys = list(groups)
    specs = {k: spec for k, (spec, _) in groups.items()}
    labelled = bool((data.labels >= 0).all())
    with host.lock, seeded_torch(seeds.dropout_seed(seed)):
        for spec, state in groups.values():
            host.set_state(spec, state)
        host.set_base_deltas({})

        def all_logits() -> list[torch.Tensor]:
            return [predict(host.activate(specs[k]), data, eval_batch_size) for k in keys]

        before, pairwise_before = group_divergence(all_logits(), temperature)
        optimizers = {}
        for k in keys:
            params = [p for p in host.activate(specs[k]).parameters() if p.requires_grad]
            optimizers[k] = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seeds.batch_order_seed(seed))
        total, steps = 0.0, 0
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            for begin in range(0, len(data), batch_size):
                idx = order[begin : begin + batch_size]
                targets = []
                with torch.no_grad():
                    for k in keys:
                        model = host.activate(specs[k])
                        model.eval()
                        targets.append(_forward(model, data, idx))
                for m, k in enumerate(keys):
                    model = host.activate(specs[k])
                    model.train()
                    logits = _forward(model, data, idx)
                    if mode == "ensemble":
                        loss = ensemble_loss(logits, targets, temperature)
                    else:
                        peers = targets[:m] + targets[m + 1 :]
                        labels = data.labels[idx].to(logits.device) if labelled else None
                        loss = pairwise_loss(logits, peers, labels, temperature)
                    optimizers[k].zero_grad(set_to_none=True)
                    loss.backward()
                    optimizers[k].step()
                    total += float(loss.detach())
                steps += 1
        after, pairwise_after = group_divergence(all_logits(), temperature)
        states = {k: host.get_state(specs[k]) for k in keys}
    return DistillResult(
        states=states,
        kl_before=dict(zip(keys, before, strict=True)),
        kl_after=dict(zip(keys, after, strict=True)),
        pairwise_before=pairwise_before,
        pairwise_after=pairwise_after,
        loss=total / max(steps * len(keys), 1),
        steps=steps,
        seconds=time.perf_counter() - start,
    )
