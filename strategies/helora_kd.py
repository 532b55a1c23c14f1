"""HeLoRA-KD: one adapter per rank group, FedAvg per group, deep mutual learning on the server.

Fan et al., "HeLoRA: LoRA-heterogeneous Federated Fine-tuning for Foundation Models", ACM
Transactions on Internet Technology 25(2), 2025, doi:10.1145/3723877. See docs/methods/helora-kd.md.

- Groups: the clients of one tier rank r form group r; the server keeps one global adapter
  (LoRA factors and head) per distinct tier rank, each at its own rank. All groups travel in one
  global state dict whose keys carry a group prefix, ``group-r<r>/<adapter key>``.
- Distribute: a rank-r client gets group r's adapter, un-prefixed (no truncation, no padding).
- Aggregate per group [paper]: FedAvg with the data weights renormalised inside the group,
  p_k = n_k / sum_{j in group} n_j, of A, B and the head. A group without a reply keeps its adapter.
- Deep mutual learning on the public server split [code]: with z_m(x) the logits of group model m
  and the ensemble target z_bar(x) = (1/M) sum_m z_m(x) (detached), every group model m takes
  AdamW steps (lr 5e-5) for E epochs on
      L_m = T^2 * KL(softmax(z_bar / T) || softmax(z_m / T)).
  [choice] ``distillation = "pairwise"``: classic deep mutual learning,
      L_m = T^2 / (M - 1) * sum_{j != m} KL(softmax(z_j / T) || softmax(z_m / T)) + CE(z_m, y).
- The distilled group adapters go back to the clients of their rank next round. The server
  evaluates and exports the largest-rank group's adapter.

The distillation loop below is a set of plain functions on an
:class:`~hetfed.adapters.AdapterHost` and a tokenized split; the Flower plumbing stays in the
strategy class.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log
from torch import nn

from hetfed import lora_algebra as la
from hetfed import wire
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.errors import ConfigError
from hetfed.models import CLASSIFICATION
from hetfed.server_model import ServerModel
from hetfed.training import Encoded, seeded_torch, task_forward
from hetfed.wire import LoraPairs, State
from strategies.base import ClientUpdate, LoRAStrategy
from strategies.zeropad import pad_and_sum

DISTILLATIONS = ("ensemble", "pairwise")
_GROUP_KEY = re.compile(r"^group-r(\d+)/(.+)$")


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class HeLoRAKDOptions:
    """Options under ``helora-kd.``: the server-side distillation (defaults from methods.md).

    ``epochs = 0`` switches the distillation off (ablation: rank groups with FedAvg only).
    """

    distillation: str = "ensemble"
    temperature: float = 1.0
    lr: float = 5e-5
    epochs: int = 1
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.distillation not in DISTILLATIONS:
            raise ConfigError(
                "helora-kd.distillation", self.distillation, f"one of {', '.join(DISTILLATIONS)}"
            )
        if not self.temperature > 0:
            raise ConfigError("helora-kd.temperature", self.temperature, "a number > 0")
        if not 0 < self.lr < 1:
            raise ConfigError("helora-kd.lr", self.lr, "a number in (0, 1)")
        if self.epochs < 0:
            raise ConfigError(
                "helora-kd.epochs", self.epochs, "an integer >= 0 (0 = no distillation)"
            )
        if self.batch_size < 1:
            raise ConfigError("helora-kd.batch-size", self.batch_size, "an integer >= 1")


# ------------------------------------------------------------------------------ group state


def group_prefix(rank: int) -> str:
    """Key prefix of rank group ``rank`` in the global state: ``group-r<rank>/``."""
    return f"group-r{rank}/"


def join_groups(groups: dict[int, State]) -> State:
    """One global state dict from the groups' adapters, each key prefixed by its group."""
    return {
        group_prefix(r) + key: value for r, state in groups.items() for key, value in state.items()
    }


def split_groups(state: State) -> dict[int, State]:
    """Inverse of :func:`join_groups`: rank -> that group's un-prefixed adapter arrays."""
    groups: dict[int, State] = {}
    for key, value in state.items():
        match = _GROUP_KEY.match(key)
        if match is None:
            raise ValueError(f"key {key!r} belongs to no rank group (expected 'group-r<r>/...')")
        groups.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return dict(sorted(groups.items()))


# ------------------------------------------------------------------------------ distillation


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
    with host.lock, seeded_torch(seed):
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
        generator = torch.Generator().manual_seed(seed)
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


# ------------------------------------------------------------------------------ strategy


def _missing_public_split(value: Any) -> ConfigError:
    return ConfigError(
        "data.server-examples",
        value,
        "an integer >= 1: helora-kd needs >= 1 public server example for its distillation",
    )


class HeLoRAKD(LoRAStrategy):
    """HeLoRA-KD (Fan et al., ACM TOIT 2025): rank groups, FedAvg per group, mutual learning."""

    name = "helora-kd"
    description = "HeLoRA-KD: one adapter per rank group, FedAvg per group, server mutual learning"
    options_class = HeLoRAKDOptions
    tasks = (CLASSIFICATION,)  # its server-side loss is over class logits

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.settings.data.server_examples < 1:
            raise _missing_public_split(self.settings.data.server_examples)
        # Mean and per-group KL of the last distillation (None before the first one).
        self.last_distillation: dict[str, Any] | None = None

    def group_ranks(self) -> list[int]:
        """The distinct tier ranks (capped at the global rank): one global adapter each."""
        return sorted({min(t.rank, self.global_rank()) for t in self.profiles.tiers.values()})

    def source_scaling(self, rank: int) -> float:
        """A client is sent its own group's adapter, which already has its scaling."""
        return self.spec(rank).scaling

    def bind(self, server: ServerModel) -> None:
        if server.public is None or len(server.public) < 1:
            raise _missing_public_split(self.settings.data.server_examples)
        super().bind(server)

    def initial_state(self) -> State:
        """Every group starts from the truncation of one fresh rank-r_max adapter (seeded)."""
        fresh = self.server.host.initial_state(self.global_spec(), seed=self.settings.seed)
        return join_groups({r: wire.truncate_state(fresh, r) for r in self.group_ranks()})

    def distribute(self, global_state: State, rank: int) -> State:
        """A rank-``rank`` client gets its group's adapter, un-prefixed."""
        groups = split_groups(global_state)
        if rank not in groups:
            raise ValueError(f"no rank group {rank}; the global state has groups {list(groups)}")
        return dict(groups[rank])

    def model_view(self, global_state: State) -> tuple[LoraSpec, State, State]:
        """The largest-rank group's adapter is the model the server evaluates and exports."""
        group = split_groups(global_state)[self.global_rank()]
        return self.global_spec(), wire.trainable(group), wire.base_deltas(group)

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], global_state: State
    ) -> State:
        """FedAvg inside each rank group, then mutual learning of the groups (``epochs`` > 0)."""
        groups = split_groups(global_state)
        for rank, state in groups.items():
            members = [u for u in updates if u.rank == rank]
            if not members:
                continue  # no reply from this group this round: its adapter stays as it was
            lora, head = wire.split_state(state)
            groups[rank] = wire.join_state(
                self.aggregate_lora(server_round, members, lora),
                self.aggregate_head(members, head),
            )
        if self.options.epochs > 0:
            groups = self.distill(server_round, groups)
        return join_groups(groups)

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        """FedAvg of one group: B <- sum_k p_k B_k, A <- sum_k p_k A_k, p_k within the group."""
        rank = next(iter(global_lora.values()))[1].shape[0]
        weights = la.normalize_weights([u.num_examples for u in updates])
        return pad_and_sum([u.lora for u in updates], global_lora, rank, weights)

    def distill(self, server_round: int, groups: dict[int, State]) -> dict[int, State]:
        """Mutual learning of the group adapters on the public split; records the KL."""
        if self.server is None:
            raise RuntimeError("helora-kd distils on the server: bind a ServerModel first")
        opts = self.options
        result = mutual_learning(
            self.server.host,
            {r: (self.spec(r), state) for r, state in groups.items()},
            self.server.public,
            mode=opts.distillation,
            temperature=opts.temperature,
            lr=opts.lr,
            epochs=opts.epochs,
            batch_size=opts.batch_size,
            seed=self.settings.seed * 100_003 + server_round,
            weight_decay=self.settings.train.weight_decay,
            eval_batch_size=self.settings.train.eval_batch_size,
        )
        self.last_distillation = {
            "round": server_round,
            "kl_before": float(np.mean(list(result.kl_before.values()))),
            "kl_after": float(np.mean(list(result.kl_after.values()))),
            "per_group_before": result.kl_before,
            "per_group_after": result.kl_after,
            "pairwise_before": result.pairwise_before,
            "pairwise_after": result.pairwise_after,
            "loss": result.loss,
            "steps": result.steps,
            "seconds": result.seconds,
        }
        log(
            INFO,
            "helora-kd: round %d %s distillation on %d public examples, %d steps: "
            "mean KL to ensemble %.4g -> %.4g, pairwise %.4g -> %.4g (%.1f s)",
            server_round,
            opts.distillation,
            len(self.server.public),
            result.steps,
            self.last_distillation["kl_before"],
            self.last_distillation["kl_after"],
            result.pairwise_before,
            result.pairwise_after,
            result.seconds,
        )
        return {r: result.states[r] for r in groups}
