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

The distillation loop is :func:`hetfed.mutual_learning.mutual_learning`, plain functions on an
:class:`~hetfed.adapters.AdapterHost` and a tokenized split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.common.logger import log

from hetfed import adapter_state, seeds
from hetfed.adapter_state import LoraPairs, State
from hetfed.adapters import LoraSpec
from hetfed.aggregation import padded_weighted_sum
from hetfed.errors import ConfigError
from hetfed.models import CLASSIFICATION
from hetfed.mutual_learning import DISTILLATIONS, mutual_learning
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate

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


# ------------------------------------------------------------------------------ strategy


class HeLoRAKD(LoRAStrategy):
    """HeLoRA-KD (Fan et al., ACM TOIT 2025): rank groups, FedAvg per group, mutual learning."""

    name = "helora-kd"
    description = "HeLoRA-KD: one adapter per rank group, FedAvg per group, server mutual learning"
    options_class = HeLoRAKDOptions
    tasks = (CLASSIFICATION,)  # its server-side loss is over class logits

    # Mean and per-group KL of the last distillation (None before the first one).
    last_distillation: dict[str, Any] | None = None

    def server_examples_needed(self) -> int:
        return 1  # the public split of its distillation

    def group_ranks(self) -> list[int]:
        """The distinct tier ranks (capped at the global rank): one global adapter each."""
        return sorted({min(t.rank, self.global_rank()) for t in self.profiles.tiers.values()})

    def source_scaling(self, rank: int) -> float:
        """A client is sent its own group's adapter, which already has its scaling."""
        return self.spec(rank).scaling

    def initial_state(self) -> State:
        """Every group starts from the truncation of one fresh rank-r_max adapter (seeded)."""
        fresh = super().initial_state()
        return join_groups({r: adapter_state.truncate_state(fresh, r) for r in self.group_ranks()})

    def distribute(self, global_state: State, rank: int) -> State:
        """A rank-``rank`` client gets its group's adapter, un-prefixed."""
        groups = split_groups(global_state)
        if rank not in groups:
            raise ValueError(f"no rank group {rank}; the global state has groups {list(groups)}")
        return dict(groups[rank])

    def model_view(self, global_state: State) -> tuple[LoraSpec, State, State]:
        """The largest-rank group's adapter is the model the server evaluates and exports."""
        return super().model_view(split_groups(global_state)[self.global_rank()])

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], global_state: State
    ) -> State:
        """FedAvg inside each rank group, then mutual learning of the groups (``epochs`` > 0)."""
        groups = split_groups(global_state)
        for rank, state in groups.items():
            members = [u for u in updates if u.rank == rank]
            if not members:
                continue  # no reply from this group this round: its adapter stays as it was
            lora, head = adapter_state.split_state(state)
            groups[rank] = adapter_state.join_state(
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
        weights = self.policy_weights(updates)  # p_k over the group's replies
        return padded_weighted_sum([u.lora for u in updates], global_lora, rank, weights)

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
            seed=seeds.round_seed(self.settings.seed, server_round),
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
