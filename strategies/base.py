"""The shared base of every hetfed strategy: distribute, train locally, aggregate.

:class:`LoRAStrategy` is a Flower :class:`~flwr.serverapp.strategy.Strategy` (Message API). It
does the plumbing every method needs: sampling nodes, learning each node's device budget (a query
message the first time a node is sampled), building one message per node with the adapter that
node can afford, validating replies, averaging the task head, and counting bytes and failures
per round. A method subclasses it and overrides a few hooks:

- :meth:`global_rank` / :meth:`initial_state` - the server's global adapter;
- :meth:`client_rank`, :meth:`client_alpha`, :meth:`client_config`, :meth:`distribute` - what a
  node is sent (default: the truncation of the global adapter to its tier's rank);
- :meth:`allowed_reply_ranks` - the ranks a node may answer with;
- :meth:`aggregate_lora` - the method's aggregation rule (the math lives in
  :mod:`hetfed.lora_algebra`), or :meth:`aggregate` for methods whose global state is more than
  one adapter;
- :meth:`accept` - per-node bookkeeping after a valid reply;
- :meth:`model_view` - which model the server evaluates and exports.
"""

from __future__ import annotations

import random
import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hetfed import lora_algebra as la
from hetfed import wire
from hetfed.adapters import LoraSpec
from hetfed.config import RunSettings
from hetfed.profiles import DeviceProfiles
from hetfed.server_model import ServerModel
from hetfed.wire import LoraPairs, State


@dataclass(frozen=True)
class NodeBudget:
    """What a node told the server it can afford."""

    tier: str
    rank: int
    layers: int | None = None  # how many transformer blocks it trains (None: all)


@dataclass
class ClientUpdate:
    """One valid training reply, decoded."""

    node_id: int
    num_examples: int
    rank: int
    state: State
    metrics: dict[str, float]

    @cached_property  # aggregation asks for it once per module
    def lora(self) -> LoraPairs:
        return wire.split_state(self.state)[0]

    @cached_property
    def head(self) -> State:
        return wire.split_state(self.state)[1]

    def restricted(self, modules: list[str]) -> ClientUpdate:
        """This update with only the given LoRA modules (and the head)."""
        pairs, head = wire.split_state(self.state)
        state = wire.join_state({m: pairs[m] for m in modules}, head)
        return ClientUpdate(self.node_id, self.num_examples, self.rank, state, self.metrics)


@dataclass
class RoundStats:
    """Counters of one round, written to ``metrics.jsonl`` by the ServerApp."""

    sampled: int = 0
    replied: int = 0
    failed: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)


class LoRAStrategy(Strategy):
    """Base of the heterogeneous-LoRA strategies; see the module docstring for the hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options_class: ClassVar[type | None] = None

    def __init__(
        self,
        settings: RunSettings,
        profiles: DeviceProfiles,
        options: Any = None,
        num_layers: int | None = None,
    ) -> None:
        self.settings = settings
        self.profiles = profiles
        self.options = options
        self.num_layers = num_layers  # transformer blocks of the base model, for layer budgets
        self.budgets: dict[int, NodeBudget] = {}
        self.stats: dict[int, RoundStats] = {}
        self._rng = random.Random(settings.seed)
        self._sent: dict[int, tuple[int, State]] = {}  # node -> (rank, arrays) of this round
        self._global_state: State = {}  # the global adapter this round started from
        self.server: ServerModel | None = None

    # ------------------------------------------------------------------ hooks for methods
    def global_rank(self) -> int:
        """Rank of the server's global adapter: the largest budget by default."""
        return self.profiles.max_rank

    def global_spec(self) -> LoraSpec:
        rank = self.global_rank()
        lora = self.settings.lora
        return LoraSpec(rank, self.client_alpha(rank), lora.modules(), lora.dropout)

    def bind(self, server: ServerModel) -> None:
        """Receive the ServerApp's model (for server-side computation) before the first round."""
        self.server = server

    def initial_state(self) -> State:
        """The global state before round 1: a fresh adapter at the global rank (seeded)."""
        return self.server.host.initial_state(self.global_spec(), seed=self.settings.seed)

    def model_view(self, global_state: State) -> tuple[LoraSpec, State, State]:
        """The one model the server evaluates and exports: (spec, adapter arrays, base deltas)."""
        return self.global_spec(), wire.trainable(global_state), wire.base_deltas(global_state)

    def client_rank(self, node_id: int) -> int:
        """The rank node ``node_id`` trains this round (its budget by default)."""
        return min(self.budgets[node_id].rank, self.global_rank())

    def client_alpha(self, rank: int) -> float:
        """LoRA alpha of a rank-``rank`` client; its scaling is s = alpha / rank."""
        return self.settings.lora.alpha

    def client_config(self, server_round: int, node_id: int) -> dict[str, Any]:
        """Method-specific instructions added to a node's train config."""
        return {}

    def participates(self, node_id: int) -> bool:
        """Whether a sampled node with a known budget trains (a baseline may exclude tiers)."""
        return True

    def client_layers(self, server_round: int, node_id: int) -> list[int] | None:
        """The transformer blocks node ``node_id`` trains this round; None means all."""
        return None

    def distribute(self, global_state: State, rank: int) -> State:
        """The arrays a rank-``rank`` client starts from: truncation of the global adapter."""
        return wire.truncate_state(global_state, rank)

    def allowed_reply_ranks(self, node_id: int, sent_rank: int) -> set[int]:
        return {sent_rank}

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], global_state: State
    ) -> State:
        """New global state: the method's LoRA rule, the p_k-averaged head, deltas unchanged.

        When clients train different layers, each module is aggregated over the clients that
        returned it (modules with the same contributors go to ``aggregate_lora`` together); a
        module nobody trained keeps its global value bit for bit.
        """
        global_lora, global_head = wire.split_state(global_state)
        by_contributors: dict[tuple[int, ...], list[str]] = {}
        for module in global_lora:
            contributors = tuple(i for i, u in enumerate(updates) if module in u.lora)
            by_contributors.setdefault(contributors, []).append(module)
        new_lora = dict(global_lora)
        for contributors, modules in by_contributors.items():
            if contributors:
                subset = [updates[i].restricted(modules) for i in contributors]
                new_lora |= self.aggregate_lora(
                    server_round, subset, {m: global_lora[m] for m in modules}
                )
        new_head = self.aggregate_head(updates, global_head)
        return wire.with_base_deltas(
            wire.join_state(new_lora, new_head), wire.base_deltas(global_state)
        )

    @abstractmethod
    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        """The method's rule: new global LoRA modules from the valid updates."""

    def aggregate_head(self, updates: list[ClientUpdate], global_head: State) -> State:
        """Every method averages the task head with the data weights p_k = n_k / sum(n)."""
        if not global_head:
            return {}
        weights = la.normalize_weights([u.num_examples for u in updates])
        return {
            key: la.weighted_sum([u.state[key] for u in updates], weights).astype(ref.dtype)
            for key, ref in global_head.items()
        }

    def accept(self, update: ClientUpdate) -> None:
        """Bookkeeping after a valid reply (HetLoRA records the pruned rank here)."""

    def describe(self) -> str:
        """One line with the method's options, for the log and summary.json."""
        return f"{self.name}: {self.options}" if self.options is not None else self.name

    # ------------------------------------------------------------------ Flower plumbing
    def summary(self) -> None:
        log(INFO, "\t├──> hetfed strategy %s (global rank %d)", self.describe(), self.global_rank())
        log(INFO, "\t└──> tiers: %s", {n: t.rank for n, t in self.profiles.tiers.items()})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        stats = self.stats.setdefault(server_round, RoundStats())
        sampled = self._sample(grid)
        known = self._learn_budgets(grid, sampled)  # a node that cannot say its budget fails
        node_ids = [n for n in known if self.participates(n)]
        stats.sampled = len(node_ids) + len(sampled) - len(known)
        global_state = self._global_state = wire.from_record(arrays)
        messages, self._sent = [], {}
        for node_id in node_ids:
            rank = self.client_rank(node_id)
            layers = self.client_layers(server_round, node_id)
            state = self.distribute(global_state, rank)
            node_config = {
                wire.SERVER_ROUND: server_round,
                wire.RANK: rank,
                wire.LORA_ALPHA: float(self.client_alpha(rank)),
                wire.SEED: self.settings.seed * 100_003 + server_round,
                **self.client_config(server_round, node_id),
            }
            expected = wire.trainable(state)
            if layers is not None:
                node_config[wire.LAYERS] = sorted(layers)
                expected = wire.restrict_to_layers(expected, layers)
            content = RecordDict(
                {wire.ARRAYS: wire.to_record(state), wire.CONFIG: ConfigRecord(node_config)}
            )
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
            self._sent[node_id] = (rank, expected)
            stats.bytes_down += wire.nbytes(state)
        stats.ranks = {str(n): self._sent[n][0] for n in node_ids}
        log(
            INFO,
            "configure_train: round %d sends %d nodes their adapters (ranks %s)",
            server_round,
            len(node_ids),
            sorted(r for r, _ in self._sent.values()),
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats())
        updates = [u for u in (self._decode(m, stats) for m in replies) if u is not None]
        stats.replied = len(updates)
        stats.failed = stats.sampled - stats.replied
        if not updates:
            log(
                WARNING,
                "aggregate_train: no valid reply in round %d; global adapter kept",
                server_round,
            )
            return None, None
        for update in updates:
            self.accept(update)
        new_state = self.aggregate(server_round, updates, self._global_state)
        weights = la.normalize_weights([u.num_examples for u in updates])
        stats.train_loss = float(
            sum(w * u.metrics[wire.TRAIN_LOSS] for w, u in zip(weights, updates, strict=False))
        )
        metrics = MetricRecord(
            {
                wire.TRAIN_LOSS: stats.train_loss,
                wire.NUM_EXAMPLES: sum(u.num_examples for u in updates),
            }
        )
        return wire.to_record(new_state), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # hetfed evaluates the global model centrally (ServerApp's evaluate_fn)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ internals
    def _sample(self, grid: Grid) -> list[int]:
        """Wait for ``min-available-nodes`` and sample ``fraction-train`` of them (seeded)."""
        deadline = time.monotonic() + self.settings.round_timeout
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < self.settings.min_available_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(node_ids)} nodes connected, "
                    f"min-available-nodes is {self.settings.min_available_nodes}"
                )
            time.sleep(1.0)
            node_ids = sorted(grid.get_node_ids())
        size = max(int(len(node_ids) * self.settings.fraction_train), self.settings.min_train_nodes)
        return sorted(self._rng.sample(node_ids, min(size, len(node_ids))))

    def _learn_budgets(self, grid: Grid, node_ids: list[int]) -> list[int]:
        """Ask nodes seen for the first time for their tier and rank; drop those that fail."""
        unknown = [n for n in node_ids if n not in self.budgets]
        if unknown:
            content = RecordDict({wire.CONFIG: ConfigRecord({wire.PROFILES: self.profiles.text})})
            queries = [
                Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown
            ]
            for reply in grid.send_and_receive(queries, timeout=self.settings.round_timeout):
                node_id = reply.metadata.src_node_id
                if reply.has_error():
                    log(
                        WARNING,
                        "node %d did not report its budget: %s",
                        node_id,
                        reply.error.reason,
                    )
                    continue
                budget = reply.content[wire.BUDGET]
                tier = str(budget[wire.TIER])
                layers = None
                if self.num_layers is not None and tier in self.profiles.tiers:
                    layers = self.profiles.tiers[tier].layer_budget(self.num_layers)
                self.budgets[node_id] = NodeBudget(tier, int(budget[wire.RANK]), layers)
            log(
                INFO,
                "budgets: %d nodes known, tiers %s",
                len(self.budgets),
                dict(Counter(b.tier for b in self.budgets.values())),
            )
        return [n for n in node_ids if n in self.budgets]

    def _decode(self, reply: Message, stats: RoundStats) -> ClientUpdate | None:
        """A valid reply as a :class:`ClientUpdate`, or None after logging why it was rejected."""
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d failed: %s", node_id, reply.error.reason)
            return None
        try:
            metrics = reply.content[wire.METRICS]
            state = wire.from_record(reply.content[wire.ARRAYS])
            rank = int(metrics[wire.RANK])
            num_examples = int(metrics[wire.NUM_EXAMPLES])
            train_loss = float(metrics[wire.TRAIN_LOSS])
        except (KeyError, TypeError, ValueError) as err:
            log(WARNING, "rejected reply of node %d: missing or malformed %s", node_id, err)
            return None
        stats.bytes_up += wire.nbytes(state)
        sent_rank, sent_state = self._sent.get(node_id, (None, None))
        allowed = self.allowed_reply_ranks(node_id, sent_rank) if sent_rank else set()
        problem = None
        if sent_state is None:
            problem = "it was not sent anything this round"
        elif rank not in allowed:
            problem = f"it claims rank {rank}, allowed {sorted(allowed)}"
        elif num_examples < 1 or not np.isfinite(train_loss):
            problem = f"num-examples {num_examples}, train-loss {train_loss}"
        else:
            problem = wire.reply_problem(state, sent_state, rank)
        if problem:
            log(WARNING, "rejected reply of node %d: %s", node_id, problem)
            return None
        return ClientUpdate(
            node_id, num_examples, rank, state, {k: float(v) for k, v in metrics.items()}
        )
