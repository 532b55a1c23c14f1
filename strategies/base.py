"""The shared base of every hetfed strategy: distribute, train locally, aggregate.

:class:`LoRAStrategy` is a Flower :class:`~flwr.serverapp.strategy.Strategy` (Message API). It
does the plumbing every method needs: learning each node's device budget (a query message the
first time a node is seen), sampling, building one message per client with the adapter that
client can afford, validating replies, averaging the task head, and counting bytes and failures
per round. Clients are named by a stable *client id* (their partition in simulation, or a
``client-id`` node-config value), learned with the budget; node ids change between runs, client
ids do not, so sampling, per-client state and seeds are the same in a resumed run. Rounds run
under :meth:`start`, which retries or skips a round with fewer than ``min-train-replies`` valid
replies and calls back after each round (the ServerApp checkpoints there). A method subclasses
it and overrides a few hooks:

- :meth:`global_rank` / :meth:`initial_state` - the server's global adapter;
- :meth:`client_rank`, :meth:`client_alpha`, :meth:`client_config`, :meth:`distribute` - what a
  client is sent (default: the truncation of the global adapter to its tier's rank);
- :meth:`source_scaling` - the scaling of the global adapter a client's arrays are cut from
  (the base converts B between it and the client's scaling both ways, :mod:`hetfed.scaling`);
- :meth:`allowed_reply_ranks` - the ranks a client may answer with;
- :meth:`aggregate_lora` - the method's aggregation rule (the math lives in
  :mod:`hetfed.lora_algebra`), or :meth:`aggregate` for methods whose global state is more than
  one adapter;
- :meth:`accept` - per-client bookkeeping after a valid reply;
- :meth:`model_view` - which model the server evaluates and exports;
- :meth:`state_dict` / :meth:`load_state_dict` - what it keeps between rounds, for checkpoints.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from hetfed import lora_algebra as la
from hetfed import wire
from hetfed.adapters import LoraSpec
from hetfed.config import RunSettings
from hetfed.models import TASKS
from hetfed.profiles import DeviceProfiles
from hetfed.scaling import rescale_b, rule_alpha
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
    """One valid training reply, decoded.

    Its LoRA product means ``scaling * B A``: with ``lora.rescale`` the base has converted B to
    the scaling of the global adapter (:meth:`LoRAStrategy.source_scaling`), otherwise it is
    the scaling the client trained at.
    """

    client_id: int
    num_examples: int
    rank: int
    state: State
    metrics: dict[str, float]
    scaling: float

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
        return ClientUpdate(
            self.client_id, self.num_examples, self.rank, state, self.metrics, self.scaling
        )


@dataclass(frozen=True)
class SentAdapter:
    """What one client was sent this round, to check and convert its reply."""

    rank: int
    expected: State  # the arrays it must return (shapes; the sent values for the norm bound)
    scaling: float  # s_k, the scaling it trains at
    source_scaling: float  # s_g of the global adapter its arrays were cut from


@dataclass
class RoundStats:
    """Counters of one round (over all its attempts), written to ``metrics.jsonl``."""

    sampled: int = 0  # messages sent
    replied: int = 0  # valid replies
    failed: int = 0  # sampled - replied: errors, timeouts and rejected replies
    rejected: int = 0  # replies that arrived but failed validation
    attempts: int = 0
    skipped: bool = False  # every attempt had fewer than min-train-replies valid replies
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    # wall time from the start of configure_train to the end of aggregate_train, all attempts
    train_seconds: float = 0.0


class LoRAStrategy(Strategy):
    """Base of the heterogeneous-LoRA strategies; see the module docstring for the hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options_class: ClassVar[type | None] = None
    # the model.task values it supports (a strategy that trains on the server may need classes)
    tasks: ClassVar[tuple[str, ...]] = TASKS

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
        self.budgets: dict[int, NodeBudget] = {}  # by client id
        self.stats: dict[int, RoundStats] = {}
        self.attempt = 0  # of the current round (0 unless it is being retried)
        self._node_of: dict[int, int] = {}  # client id -> Flower node id in this run
        self._client_of: dict[int, int] = {}  # Flower node id -> client id
        self._sent: dict[int, SentAdapter] = {}
        self._global_state: State = {}  # the global adapter this round started from
        self.server: ServerModel | None = None

    # ------------------------------------------------------------------ hooks for methods
    def global_rank(self) -> int:
        """Rank of the server's global adapter: the largest budget by default."""
        return self.profiles.max_rank

    def spec(self, rank: int) -> LoraSpec:
        """The peft adapter of a rank-``rank`` model of this method (its alpha, its scaling)."""
        lora = self.settings.lora
        rslora = lora.scaling == "rslora"
        return LoraSpec(rank, self.client_alpha(rank), lora.modules(), lora.dropout, rslora)

    def global_spec(self) -> LoraSpec:
        return self.spec(self.global_rank())

    def source_scaling(self, rank: int) -> float:
        """The scaling of the global adapter whose arrays a rank-``rank`` client gets: the one
        global adapter's s_g by default (a method with one adapter per rank overrides it)."""
        return self.global_spec().scaling

    def bind(self, server: ServerModel) -> None:
        """Receive the ServerApp's model (for server-side computation) before the first round."""
        self.server = server

    def initial_state(self) -> State:
        """The global state before round 1: a fresh adapter at the global rank (seeded)."""
        return self.server.host.initial_state(self.global_spec(), seed=self.settings.seed)

    def model_view(self, global_state: State) -> tuple[LoraSpec, State, State]:
        """The one model the server evaluates and exports: (spec, adapter arrays, base deltas)."""
        return self.global_spec(), wire.trainable(global_state), wire.base_deltas(global_state)

    def client_rank(self, client_id: int) -> int:
        """The rank client ``client_id`` trains this round (its budget by default)."""
        return min(self.budgets[client_id].rank, self.global_rank())

    def client_alpha(self, rank: int) -> float:
        """LoRA alpha of a rank-``rank`` adapter under the ``lora.scaling`` rule."""
        lora = self.settings.lora
        return rule_alpha(lora.scaling, lora.alpha, rank, self.profiles.max_rank)

    def client_config(self, server_round: int, client_id: int) -> dict[str, Any]:
        """Method-specific instructions added to a client's train config."""
        return {}

    def participates(self, client_id: int) -> bool:
        """Whether a sampled client trains (a baseline may exclude tiers)."""
        return True

    def client_layers(self, server_round: int, client_id: int) -> list[int] | None:
        """The transformer blocks client ``client_id`` trains this round; None means all."""
        return None

    def distribute(self, global_state: State, rank: int) -> State:
        """The arrays a rank-``rank`` client starts from: truncation of the global adapter."""
        return wire.truncate_state(global_state, rank)

    def allowed_reply_ranks(self, client_id: int, sent_rank: int) -> set[int]:
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

    def state_dict(self) -> dict[str, Any]:
        """What the method keeps between rounds besides the global state, as JSON types.

        Budgets are not part of it (clients report them again in a resumed run) and there is
        no RNG state: every draw is seeded by (seed, round, attempt, client id).
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (resume)."""

    def describe(self) -> str:
        """One line with the method's options, for the log and summary.json."""
        return f"{self.name}: {self.options}" if self.options is not None else self.name

    # ------------------------------------------------------------------ Flower plumbing
    def summary(self) -> None:
        log(INFO, "\t├──> hetfed strategy %s (global rank %d)", self.describe(), self.global_rank())
        log(INFO, "\t└──> tiers: %s", {n: t.rank for n, t in self.profiles.tiers.items()})

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        on_round_end: Callable[[int, ArrayRecord], None] | None = None,
    ) -> Result:
        """Flower's round loop, with hetfed's additions.

        A round that gets fewer than ``min-train-replies`` valid replies is tried again with a
        fresh sample (``too-few-replies = "retry"``, at most ``max-retries`` times) or skipped,
        keeping the global state. Rounds start at ``first_round`` (a resumed run), and
        ``on_round_end(round, arrays)`` runs after each round's evaluation. hetfed evaluates
        centrally (``evaluate_fn``), so there is no client-side evaluation round.
        """
        log(INFO, "Starting %s strategy, rounds %d..%d:", self.name, first_round, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result(arrays=initial_arrays)
        if evaluate_fn is not None and first_round == 1:
            metrics = evaluate_fn(0, initial_arrays)
            if metrics is not None:
                result.evaluate_metrics_serverapp[0] = metrics
        arrays = initial_arrays
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            new_arrays, train_metrics = self.train_round(
                server_round, arrays, train_config, grid, timeout
            )
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
                result.train_metrics_clientapp[server_round] = train_metrics
            if evaluate_fn is not None:
                metrics = evaluate_fn(server_round, arrays)
                if metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = metrics
            if on_round_end is not None:
                on_round_end(server_round, arrays)
        return result

    def train_round(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        timeout: float,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Send, receive and aggregate one round; retried or skipped when replies are too few."""
        settings = self.settings
        stats = self.stats.setdefault(server_round, RoundStats())
        attempts = 1 + (settings.max_retries if settings.too_few_replies == "retry" else 0)
        for attempt in range(attempts):
            self.attempt = attempt
            stats.attempts = attempt + 1
            started = time.perf_counter()
            messages = list(self.configure_train(server_round, arrays, config, grid))
            replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
            new_arrays, metrics = self.aggregate_train(server_round, replies)
            stats.train_seconds += time.perf_counter() - started
            if new_arrays is not None:
                return new_arrays, metrics
            if attempt + 1 < attempts:
                log(WARNING, "round %d: retry %d of %d", server_round, attempt + 1, attempts - 1)
        stats.skipped = True
        log(
            WARNING,
            "round %d skipped after %d attempt(s): fewer than min-train-replies=%d valid "
            "replies; the global adapter is kept",
            server_round,
            attempts,
            settings.min_train_replies,
        )
        return None, None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        stats = self.stats.setdefault(server_round, RoundStats())
        available = self._register(grid)
        clients = [c for c in self._sample(server_round, available) if self.participates(c)]
        faults = self._injected_faults(server_round, clients)
        global_state = self._global_state = wire.from_record(arrays)
        messages, self._sent = [], {}
        for client_id in clients:
            rank = self.client_rank(client_id)
            layers = self.client_layers(server_round, client_id)
            spec = self.spec(rank)
            source_scaling = self.source_scaling(rank)
            state = self.distribute(global_state, rank)
            if self.settings.lora.rescale:  # s_k B_k A_k = s_g B[:, :r_k] A[:r_k, :]
                ratio = source_scaling / spec.scaling
                state = wire.map_lora(state, lambda b, a, f=ratio: rescale_b(b, a, f))
            node_config = {
                wire.SERVER_ROUND: server_round,
                wire.RANK: rank,
                wire.LORA_ALPHA: float(spec.alpha),
                wire.LORA_RSLORA: spec.rslora,
                wire.LORA_SCALING: spec.scaling,
                wire.SEED: self.settings.seed * 100_003 + server_round,
                **self.client_config(server_round, client_id),
            }
            if client_id in faults:
                node_config[wire.FAULT] = faults[client_id]
                node_config[wire.FAULT_SECONDS] = self.settings.round_timeout + 5.0
            expected = wire.trainable(state)
            if layers is not None:
                node_config[wire.LAYERS] = sorted(layers)
                expected = wire.restrict_to_layers(expected, layers)
            content = RecordDict(
                {wire.ARRAYS: wire.to_record(state), wire.CONFIG: ConfigRecord(node_config)}
            )
            node_id = self._node_of[client_id]
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
            self._sent[client_id] = SentAdapter(rank, expected, spec.scaling, source_scaling)
            stats.bytes_down += wire.nbytes(state)
        stats.sampled += len(clients)
        stats.ranks = {str(c): self._sent[c].rank for c in clients}
        log(
            INFO,
            "configure_train: round %d sends %d clients their adapters (ranks %s)%s",
            server_round,
            len(clients),
            sorted(sent.rank for sent in self._sent.values()),
            f"; injected faults {faults}" if faults else "",
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats())
        updates = [u for u in (self._decode(m, stats) for m in replies) if u is not None]
        updates.sort(key=lambda u: u.client_id)  # replies arrive in any order; sums must not
        stats.replied += len(updates)
        stats.failed = stats.sampled - stats.replied
        if len(updates) < self.settings.min_train_replies:
            log(
                WARNING,
                "aggregate_train: round %d got %d valid replies, min-train-replies is %d",
                server_round,
                len(updates),
                self.settings.min_train_replies,
            )
            return None, None
        for update in updates:
            self.accept(update)
        new_state = self.aggregate(server_round, updates, self._global_state)
        weights = la.normalize_weights([u.num_examples for u in updates])
        stats.train_loss = float(
            sum(w * u.metrics[wire.TRAIN_LOSS] for w, u in zip(weights, updates, strict=True))
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
    def _register(self, grid: Grid) -> list[int]:
        """Wait for ``min-available-nodes``, learn the budget of nodes not seen before, and
        return the sorted client ids of the connected nodes that reported one."""
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
        unknown = [n for n in node_ids if n not in self._client_of]
        if unknown:
            self._query_budgets(grid, unknown, set(node_ids))
        return sorted(self._client_of[n] for n in node_ids if n in self._client_of)

    def _query_budgets(self, grid: Grid, nodes: list[int], connected: set[int]) -> None:
        """Ask nodes for their tier, rank and client id (once per node and run)."""
        content = RecordDict({wire.CONFIG: ConfigRecord({wire.PROFILES: self.profiles.text})})
        queries = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in grid.send_and_receive(queries, timeout=self.settings.round_timeout):
            node_id = reply.metadata.src_node_id
            budget, problem = self._budget_of(reply)
            client_id = budget[0] if budget else None
            bound = self._node_of.get(client_id) if client_id is not None else None
            if problem is None and bound is not None and bound in connected:
                problem = f"client id {client_id} is already used by connected node {bound}"
            if problem is not None:
                log(WARNING, "node %d has no budget (it will be asked again): %s", node_id, problem)
                continue
            self._client_of.pop(bound, None)  # a client that came back under a new node id
            self._node_of[client_id] = node_id
            self._client_of[node_id] = client_id
            self.budgets[client_id] = budget[1]
        log(
            INFO,
            "budgets: %d clients known, tiers %s",
            len(self.budgets),
            dict(Counter(b.tier for b in self.budgets.values())),
        )

    def _budget_of(self, reply: Message) -> tuple[tuple[int, NodeBudget] | None, str | None]:
        """(client id, budget) of a query reply, or the reason it is unusable."""
        if reply.has_error():
            return None, reply.error.reason
        try:
            budget = reply.content[wire.BUDGET]
            tier = str(budget[wire.TIER])
            rank = budget[wire.RANK]
            client_id = budget[wire.CLIENT_ID]
        except (KeyError, TypeError) as err:
            return None, f"malformed budget reply ({err!r})"
        if tier not in self.profiles.tiers:
            return None, f"unknown tier {tier!r}"
        if not isinstance(rank, int) or not 1 <= rank <= self.profiles.tiers[tier].rank:
            return None, f"rank {rank!r} outside [1, {self.profiles.tiers[tier].rank}]"
        if not isinstance(client_id, int) or isinstance(client_id, bool):
            return None, f"client id {client_id!r} is not an integer"
        layers = None
        if self.num_layers is not None:
            layers = self.profiles.tiers[tier].layer_budget(self.num_layers)
        return (client_id, NodeBudget(tier, rank, layers)), None

    def _sample(self, server_round: int, clients: list[int]) -> list[int]:
        """``fraction-train`` of the available clients (at least ``min-train-nodes``), drawn
        with a generator seeded by (seed, round, attempt): the same clients in a resumed run."""
        size = max(int(len(clients) * self.settings.fraction_train), self.settings.min_train_nodes)
        rng = np.random.default_rng([abs(self.settings.seed), server_round, self.attempt])
        picked = rng.choice(len(clients), size=min(size, len(clients)), replace=False)
        return sorted(clients[i] for i in picked)

    def _injected_faults(self, server_round: int, clients: list[int]) -> dict[int, str]:
        """Failure injection (``faults.*``): which clients misbehave this attempt, and how."""
        faults = self.settings.faults
        if faults.fraction == 0 or not clients:
            return {}
        rng = np.random.default_rng([abs(self.settings.seed), server_round, self.attempt, 1])
        count = round(faults.fraction * len(clients))
        chosen = sorted(rng.choice(len(clients), size=count, replace=False))
        kinds = faults.kind_list()
        return {clients[i]: kinds[rng.integers(len(kinds))] for i in chosen}

    def _decode(self, reply: Message, stats: RoundStats) -> ClientUpdate | None:
        """A valid reply as a :class:`ClientUpdate`, or None after logging why it was rejected.

        A reply is untrusted input: nothing in it may raise past this point.
        """
        node_id = reply.metadata.src_node_id
        client_id = self._client_of.get(node_id)
        if reply.has_error():
            log(WARNING, "client %s (node %d) failed: %s", client_id, node_id, reply.error.reason)
            return None
        try:
            update, problem = self._validated(client_id, reply, stats)
        except Exception as err:  # noqa: BLE001 - any malformed content is a rejection
            update, problem = None, f"undecodable reply ({type(err).__name__}: {err})"
        if problem is not None:
            stats.rejected += 1
            log(WARNING, "rejected reply of client %s (node %d): %s", client_id, node_id, problem)
        return update

    def _validated(
        self, client_id: int | None, reply: Message, stats: RoundStats
    ) -> tuple[ClientUpdate | None, str | None]:
        try:
            metrics = reply.content[wire.METRICS]
            state = wire.from_record(reply.content[wire.ARRAYS])
            rank = int(metrics[wire.RANK])
            num_examples = int(metrics[wire.NUM_EXAMPLES])
            train_loss = float(metrics[wire.TRAIN_LOSS])
        except (KeyError, TypeError, ValueError) as err:
            return None, f"missing or malformed {err}"
        stats.bytes_up += wire.nbytes(state)
        sent = self._sent.get(client_id)
        if sent is None:
            return None, "it was not sent anything this round"
        allowed = self.allowed_reply_ranks(client_id, sent.rank)
        if rank not in allowed:
            return None, f"it claims rank {rank}, allowed {sorted(allowed)}"
        if num_examples < 1 or not np.isfinite(train_loss):
            return None, f"num-examples {num_examples}, train-loss {train_loss}"
        problem = wire.reply_problem(state, sent.expected, rank)
        if problem is None and self.settings.max_update_norm > 0:
            norm = wire.update_norm(state, sent.expected)
            bound = self.settings.max_update_norm
            if norm > bound:
                problem = f"update norm {norm:.4g} > max-update-norm {bound}"
        if problem is not None:
            return None, problem
        del self._sent[client_id]  # a second reply from the same client is not counted twice
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        scaling = sent.scaling  # what it trained at, also when it pruned its rank
        if self.settings.lora.rescale:  # the product keeps its size: B times s_k / s_g
            ratio, scaling = sent.scaling / sent.source_scaling, sent.source_scaling
            state = wire.map_lora(state, lambda b, a: rescale_b(b, a, ratio))
        return ClientUpdate(client_id, num_examples, rank, state, metrics, scaling), None
