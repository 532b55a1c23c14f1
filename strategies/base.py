"""The shared base of every hetfed strategy: distribute, train locally, aggregate.

:class:`LoRAStrategy` is a Flower :class:`~flwr.serverapp.strategy.Strategy` (Message API) with
hetfed's round loop: each round it samples clients among those whose budget it knows
(:mod:`strategies.nodes`), sends each the adapter it can afford, checks the replies
(:mod:`strategies.replies`) and aggregates the valid ones; a round with fewer than
``min-train-replies`` is retried or skipped. Between the global adapter (scaling s_g) and a
client (s_k) it converts B both ways (``lora.rescale``, :mod:`hetfed.scaling`). A method
subclasses it and overrides a few hooks:

- ``rank_policy`` (:mod:`hetfed.rank_policies`): which rank each client trains, which reply ranks
  it accepts, how replies are weighted; :meth:`global_rank` and :meth:`initial_state`;
- :meth:`client_alpha`, :meth:`client_layers`, :meth:`client_instruction`, :meth:`distribute`,
  :meth:`participates` - what a client is sent (default: the truncation of the global adapter);
- :meth:`source_scaling` - the scaling of the global adapter a client's arrays are cut from;
- :meth:`aggregate_lora` - the method's rule (the math lives in :mod:`hetfed.aggregation` and
  :mod:`hetfed.lora_algebra`), or :meth:`aggregate` when the global state is more than one adapter;
- :meth:`accept`, :meth:`model_view`, :meth:`state_dict` / :meth:`load_state_dict`.

Class attributes declare what a method needs, checked once when it is built: ``tasks``,
``requires`` (settings it cannot run without) and :meth:`server_examples_needed`. ``personal``
names the LoRA factors each client keeps to itself across rounds: the base never sends them,
tells the client to keep them under the run's ``personal_key`` (checkpointed), and completes
each reply with their global values, so the method's rule still sees factor pairs.
"""

from __future__ import annotations

import time
import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from logging import INFO, WARNING
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from hetfed import adapter_state, seeds, wire
from hetfed.adapter_state import LoraPairs, State
from hetfed.adapters import LoraSpec
from hetfed.aggregation import Weights, head_average
from hetfed.budgets import required_memory_gb
from hetfed.config import RunSettings, setting
from hetfed.device_clock import DeviceClock
from hetfed.errors import ConfigError
from hetfed.faults import choose_faults
from hetfed.metrics import client_distribution
from hetfed.models import TASKS
from hetfed.profiles import DeviceProfiles, Tier
from hetfed.rank_policies import TierRanks
from hetfed.results import RoundStats
from hetfed.scaling import rescale_state, rule_alpha
from hetfed.server_model import ServerModel
from strategies.nodes import NodeRegistry, sample_clients, sample_evaluation
from strategies.replies import (
    ClientUpdate,
    SentAdapter,
    accepted_update,
    contributor_groups,
    enough_replies,
    train_metrics,
    with_global_factors,
)


@dataclass
class RoundState:
    """The working state of the round being trained, owned by its strategy: the attempt (0
    unless the round is being retried), the global state it started from, and what each client
    was sent this attempt (struck off when its reply is accepted, so a second reply is not
    counted twice)."""

    attempt: int = 0
    global_state: State = field(default_factory=dict)
    sent: dict[int, SentAdapter] = field(default_factory=dict)
    evaluating: dict[int, int] = field(default_factory=dict)  # node -> client asked to evaluate


class LoRAStrategy(Strategy):
    """Base of the heterogeneous-LoRA strategies; see the module docstring for the hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options_class: ClassVar[type | None] = None
    tasks: ClassVar[tuple[str, ...]] = TASKS  # the model.task values it supports
    # run-config key -> (the value the method needs, why); checked when it is built
    requires: ClassVar[dict[str, tuple[Any, str]]] = {}
    # LoRA factors each client keeps to itself across rounds, never sent or returned
    # (FedSA-LoRA's B); the method aggregates what remains
    personal: ClassVar[tuple[str, ...]] = ()
    clock: DeviceClock | None = None  # the run's simulated device clock (set by the run plan)

    def __init__(
        self,
        settings: RunSettings,
        profiles: DeviceProfiles,
        options: Any = None,
        num_layers: int | None = None,
    ) -> None:
        if options is None and self.options_class is not None:
            options = self.options_class()  # every option at its default
        self.settings, self.profiles, self.options = settings, profiles, options
        self.num_layers = num_layers  # transformer blocks of the base model, for layer budgets
        self.nodes = NodeRegistry(num_layers)
        self.stats: dict[int, RoundStats] = {}
        self.round = RoundState()
        self.server: ServerModel | None = None
        # names this run's personal factors on the clients; drawn fresh, restored on a resume
        self.personal_key = uuid.uuid4().hex if self.personal else ""
        check_requirements(self)

    budgets = property(lambda self: self.nodes.budgets)  # client id -> NodeBudget

    @cached_property
    def rank_policy(self) -> TierRanks:
        """Chosen once, on first use (:meth:`make_rank_policy`)."""
        return self.make_rank_policy()

    # ------------------------------------------------------------------ hooks for methods
    def make_rank_policy(self) -> TierRanks:
        """Chosen once: by default every client trains its tier's rank under the largest one."""
        return TierRanks(self.profiles.max_rank)

    def global_rank(self) -> int:
        """Rank of the server's global adapter."""
        return self.rank_policy.global_rank

    def spec(self, rank: int) -> LoraSpec:
        """The peft adapter of a rank-``rank`` model of this method (its alpha, its scaling)."""
        lora = self.settings.lora
        rslora = lora.scaling == "rslora"
        return LoraSpec(rank, self.client_alpha(rank), lora.modules(), lora.dropout, rslora)

    def global_spec(self) -> LoraSpec:
        return self.spec(self.global_rank())

    def client_alpha(self, rank: int) -> float:
        """LoRA alpha of a rank-``rank`` adapter under the ``lora.scaling`` rule."""
        lora = self.settings.lora
        return rule_alpha(lora.scaling, lora.alpha, rank, self.profiles.max_rank)

    def source_scaling(self, rank: int) -> float:
        """The scaling of the global adapter whose arrays a rank-``rank`` client gets: the one
        global adapter's s_g by default (a method with one adapter per rank overrides it)."""
        return self.global_spec().scaling

    def server_examples_needed(self) -> int:
        """Examples of the server split (``data.server-examples``) the method computes on."""
        return 0

    def bind(self, server: ServerModel) -> None:
        """Receive the ServerApp's model (for server-side computation) before the first round."""
        check_server_examples(self, 0 if server.public is None else len(server.public))
        self.server = server

    def initial_state(self) -> State:
        """The global state before round 1: a fresh adapter at the global rank (seeded)."""
        seed = seeds.initial_adapter_seed(self.settings.seed)
        return self.server.host.initial_state(self.global_spec(), seed=seed)

    def model_view(self, global_state: State) -> tuple[LoraSpec, State, State]:
        """The one model the server evaluates and exports: (spec, adapter arrays, base deltas)."""
        deltas = adapter_state.base_deltas(global_state)
        return self.global_spec(), adapter_state.trainable(global_state), deltas

    def client_rank(self, client_id: int) -> int:
        """The rank client ``client_id`` trains this round (its rank policy decides)."""
        return self.rank_policy.client_rank(client_id, self.budgets[client_id].rank)

    def client_layers(self, server_round: int, client_id: int) -> list[int] | None:
        """The transformer blocks client ``client_id`` trains this round; None means all."""
        return None

    def client_instruction(
        self, server_round: int, client_id: int, instruction: wire.TrainInstruction
    ) -> wire.TrainInstruction:
        """The train instruction of a client; a method may add to it (e.g. frozen factors)."""
        return instruction

    def participates(self, client_id: int) -> bool:
        """Whether a sampled client trains (a baseline may exclude tiers)."""
        return True

    def distribute(self, global_state: State, rank: int) -> State:
        """The arrays a rank-``rank`` client starts from: truncation of the global adapter."""
        return adapter_state.truncate_state(global_state, rank)

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], global_state: State
    ) -> State:
        """New global state: the method's LoRA rule per group of modules with the same
        contributors (a module nobody trained keeps its value), the head, deltas unchanged."""
        global_lora, global_head = adapter_state.split_state(global_state)
        new_lora = dict(global_lora)
        for subset, modules in contributor_groups(updates, global_lora):
            new_lora |= self.aggregate_lora(server_round, subset, modules)
        new_head = self.aggregate_head(updates, global_head)
        return adapter_state.with_base_deltas(
            adapter_state.join_state(new_lora, new_head), adapter_state.base_deltas(global_state)
        )

    @abstractmethod
    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        """The method's rule: new global LoRA modules from the valid updates."""

    def policy_weights(self, updates: list[ClientUpdate]) -> Weights:
        """The rank policy's weights of these replies (p_k by default)."""
        lora, examples = [u.lora for u in updates], [u.num_examples for u in updates]
        return self.rank_policy.weights(lora, examples)

    def aggregate_head(self, updates: list[ClientUpdate], global_head: State) -> State:
        """Every method averages the task head with the data weights p_k = n_k / sum(n)."""
        return head_average(
            [u.head for u in updates], [u.num_examples for u in updates], global_head
        )

    def accept(self, update: ClientUpdate) -> None:
        """Bookkeeping after a valid reply: the rank policy learns the rank it returned."""
        self.rank_policy.accept(update.client_id, update.rank)

    def state_dict(self) -> dict[str, Any]:
        """What the method keeps between rounds besides the global state, as JSON types (no
        budgets: clients report them again; no RNG state: every draw is seeded)."""
        personal = {wire.PERSONAL_KEY: self.personal_key} if self.personal else {}
        return self.rank_policy.state_dict() | personal

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (resume)."""
        self.rank_policy.load_state_dict(state)
        if self.personal:
            self.personal_key = state[wire.PERSONAL_KEY]

    def describe(self) -> str:
        """One line with the method's options, for the log and summary.json."""
        return f"{self.name}: {self.options}" if self.options is not None else self.name

    # ------------------------------------------------------------------ the round loop
    def summary(self) -> None:
        log(INFO, "\t├──> hetfed strategy %s (global rank %d)", self.describe(), self.global_rank())
        log(INFO, "\t└──> tiers: %s", {n: t.rank for n, t in self.profiles.tiers.items()})

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        on_round_end: Callable[[int, ArrayRecord], None] | None = None,
    ) -> Result:
        """Flower's round loop from ``first_round`` (a resumed run) to ``num_rounds``. hetfed
        evaluates centrally (``evaluate_fn``, round 0 too on a fresh run); ``on_round_end(round,
        arrays)`` runs after each round's evaluation (the ServerApp checkpoints there)."""
        span = f"rounds {first_round}..{num_rounds}" if first_round <= num_rounds else "no round"
        log(INFO, "Starting %s strategy, %s left to train:", self.name, span)
        self.summary()
        rounds = range(0 if first_round == 1 else first_round, num_rounds + 1)
        loop = RoundLoop(grid, timeout, evaluate_fn, on_round_end)
        return loop.run(self, Result(arrays=initial_arrays), rounds)

    def train_round(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        timeout: float,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Send, receive and aggregate one round. While fewer than ``min-train-replies`` replies
        are valid, again with a fresh sample (``too-few-replies = "retry"``, at most
        ``max-retries`` times); then the round is skipped and the global state kept."""
        settings = self.settings
        stats = self.stats.setdefault(server_round, RoundStats())
        attempts = 1 + (settings.max_retries if settings.too_few_replies == "retry" else 0)
        for number in range(attempts):
            self.round.attempt = number
            stats.attempts = number + 1
            started = time.perf_counter()
            messages = list(self.configure_train(server_round, arrays, config, grid))
            replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
            new_arrays, metrics = self.aggregate_train(server_round, replies)
            stats.train_seconds += time.perf_counter() - started
            if new_arrays is not None:
                return new_arrays, metrics
            if number + 1 < attempts:
                log(WARNING, "round %d: retry %d of %d", server_round, number + 1, attempts - 1)
        stats.skipped = True
        log(WARNING, "round %d skipped after %d attempt(s): fewer than min-train-replies=%d "
            "valid replies; the global adapter is kept", server_round, attempts,
            settings.min_train_replies)  # fmt: skip
        return None, None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample, then per client: its rank and layers, its arrays, its message."""
        stats = self.stats.setdefault(server_round, RoundStats())
        settings = self.settings
        attempt = self.round.attempt
        known = self.register_clients(grid)  # sorted client ids whose budget is known
        sampled = sample_clients(settings, server_round, attempt, known)
        clients = [c for c in sampled if self.participates(c)]
        faults = choose_faults(settings.faults, settings.seed, server_round, attempt, clients)
        self.round.global_state = wire.from_record(arrays)
        prepared = [(c, *self.prepare(server_round, c, faults.get(c))) for c in clients]
        if self.clock is not None:  # the device clock: stragglers under a deadline
            prepared = on_the_clock(self.clock, self.tier_of, server_round, stats, prepared)
        self.round.sent = {client_id: sent for client_id, sent, _, _ in prepared}
        messages = train_messages(prepared, self.nodes.node_of, stats)
        stats.ranks = {str(c): sent.rank for c, sent in self.round.sent.items()}
        ranks, injected = sorted(stats.ranks.values()), f"; faults {faults}" if faults else ""
        log(INFO, f"configure_train: round {server_round} sends {len(prepared)} clients their "
            f"adapters (ranks {ranks}){injected}")  # fmt: skip
        return messages

    def register_clients(self, grid: Grid) -> list[int]:
        """The sorted client ids of the connected nodes whose budget is known (asked once)."""
        settings, clock = self.settings, self.clock
        needs = required_memory_gb(self.profiles, clock) if clock else None
        return self.nodes.register(
            grid, self.profiles, settings.min_available_nodes, settings.round_timeout, needs
        )

    def tier_of(self, client_id: int) -> Tier:
        """The device tier of a client whose budget is known."""
        return self.profiles.tiers[self.budgets[client_id].tier]

    def prepare(
        self, server_round: int, client_id: int, fault: str | None
    ) -> tuple[SentAdapter, State, wire.TrainInstruction]:
        """What a client is sent: its arrays, at the global model's strength
        (``lora.rescale``), and its instruction; and what is kept to check and convert its
        reply."""
        rank, layers = self.client_rank(client_id), self.client_layers(server_round, client_id)
        spec, state, source_scaling = self.sent_arrays(self.round.global_state, rank)
        instruction = self.instruction_for(
            server_round,
            spec,
            layers=tuple(layers) if layers is not None else None,
            pruning=self.rank_policy.pruning(),
            fault=fault,
            fault_seconds=self.settings.round_timeout + 5.0 if fault else 0.0,
        )
        instruction = self.client_instruction(server_round, client_id, instruction)
        expected = adapter_state.trainable(state)
        if layers is not None:
            expected = adapter_state.restrict_to_layers(expected, layers)
        return SentAdapter(rank, expected, spec.scaling, source_scaling), state, instruction

    def instruction_for(
        self, server_round: int, spec: LoraSpec, **training: Any
    ) -> wire.TrainInstruction:
        """The instruction that comes with a client's adapter (``spec``): its rank, alpha and
        scaling, the round's seed and the factors it keeps to itself; ``training``: its layers,
        pruning and fault."""
        return wire.TrainInstruction(
            server_round=server_round,
            rank=spec.rank,
            lora_alpha=spec.alpha,
            lora_rslora=spec.rslora,
            lora_scaling=spec.scaling,
            seed=seeds.round_seed(self.settings.seed, server_round),
            personal=self.personal,
            personal_key=self.personal_key,
            **training,
        )

    def sent_arrays(self, global_state: State, rank: int) -> tuple[LoraSpec, State, float]:
        """The adapter of a rank-``rank`` client (its spec), the arrays it gets from
        ``global_state`` at the global model's strength (``lora.rescale``), and the scaling of
        the global adapter they are cut from; a client's personal factors are never sent."""
        spec, source_scaling = self.spec(rank), self.source_scaling(rank)
        state = adapter_state.without_factors(self.distribute(global_state, rank), self.personal)
        if self.settings.lora.rescale:  # s_k B_k A_k = s_g B[:, :r_k] A[:r_k, :]
            state = rescale_state(state, source_scaling / spec.scaling)
        return spec, state, source_scaling

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and convert the replies, then the method's rule on the valid ones."""
        stats = self.stats.setdefault(server_round, RoundStats())
        updates = [u for u in (self.valid_update(reply, stats) for reply in replies) if u]
        updates.sort(key=lambda u: u.client_id)  # replies arrive in any order; sums must not
        stats.replied += len(updates)
        stats.failed = stats.sampled - stats.replied
        stats.pruned += sum(u.rank < stats.ranks[str(u.client_id)] for u in updates)
        stats.reply_ranks = sorted(stats.reply_ranks + [u.rank for u in updates])
        if not enough_replies(server_round, len(updates), self.settings.min_train_replies):
            return None, None
        for update in updates:
            self.accept(update)
        new_state = self.aggregate(server_round, updates, self.round.global_state)
        metrics = train_metrics(updates)
        stats.train_loss = metrics[wire.TRAIN_LOSS]
        return wire.to_record(new_state), metrics

    def valid_update(self, reply: Message, stats: RoundStats) -> ClientUpdate | None:
        """A valid reply as an update at the global scaling (:func:`accepted_update`); its
        client is then struck off the round's list, so a second reply is not counted twice."""
        client_id = self.nodes.client_of.get(reply.metadata.src_node_id)
        sent = self.round.sent.get(client_id)
        allowed = self.rank_policy.allowed_reply_ranks(client_id, sent.rank) if sent else set()
        update = accepted_update(reply, client_id, sent, allowed, self.settings, stats)
        if update is None:
            return None
        del self.round.sent[client_id]
        return with_global_factors(update, self.round.global_state, self.personal)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation (``fraction-evaluate``; the central evaluation is the ServerApp's
        evaluate_fn): a sample of the known clients each get the new global adapter as they
        would train it (their rank, at their scaling, with their instruction: a client's own
        personal factors) and score it on their own test split."""
        if self.settings.fraction_evaluate == 0:
            return []
        global_state = wire.from_record(arrays)
        clients = sample_evaluation(self.settings, server_round, self.register_clients(grid))
        self.round.evaluating = {self.nodes.node_of[c]: c for c in clients}
        messages = []
        for client_id in clients:
            rank = self.client_rank(client_id)
            spec, state, _ = self.sent_arrays(global_state, rank)
            instruction = self.instruction_for(server_round, spec)
            instruction = self.client_instruction(server_round, client_id, instruction)
            content = wire.train_content(state, instruction)
            node = self.nodes.node_of[client_id]
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The clients' accuracies on their own held-out splits of the round (a malformed or
        unexpected reply, or one without the round's splits, is logged and left out), and
        their distribution (:func:`hetfed.metrics.client_distribution`) in the round's
        statistics."""
        with_test = len(self.settings.client_splits(server_round)) > 1
        accuracies = []
        for reply in replies:
            node = reply.metadata.src_node_id
            client_id = self.round.evaluating.pop(node, None)
            problem = "not asked to evaluate" if client_id is None else None
            if problem is None and reply.has_error():
                problem = reply.error.reason
            if problem is None:
                try:
                    figures = wire.EvaluateReply.from_record(reply.content[wire.METRICS])
                    if (figures.test_accuracy is not None) != with_test:
                        raise ValueError(f"test figures {'missing' if with_test else 'unasked'}")
                    accuracies.append(figures)
                except (KeyError, TypeError, ValueError) as err:
                    problem = f"malformed evaluate reply ({err})"
            if problem is not None:
                log(WARNING, "round %d: evaluation of node %d left out: %s", server_round, node,
                    problem)  # fmt: skip
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.client_accuracies = sorted(r.accuracy for r in accuracies)
        if with_test:
            stats.client_test_accuracies = sorted(r.test_accuracy for r in accuracies)
        if not accuracies:
            return None
        figures = client_distribution(stats.client_accuracies)
        log(INFO, "round %d: %d clients evaluated on their %s splits, mean accuracy %.4f, "
            "worst 10%% %.4f", server_round, len(accuracies), self.settings.client_split,
            figures["client_accuracy_mean"], figures["client_accuracy_worst10"])  # fmt: skip
        return MetricRecord(figures)


def train_messages(
    prepared: list[tuple], node_of: dict[int, int], stats: RoundStats
) -> list[Message]:
    """One TRAIN message per prepared client (its arrays and instruction); counts the clients
    sent to and the bytes."""
    messages = []
    for client_id, _, state, instruction in prepared:
        content = wire.train_content(state, instruction)
        messages.append(
            Message(content, dst_node_id=node_of[client_id], message_type=MessageType.TRAIN)
        )
        stats.bytes_down += wire.nbytes(state)
    stats.sampled += len(messages)
    return messages


def on_the_clock(
    clock: DeviceClock,
    tier_of: Callable[[int], Tier],
    server_round: int,
    stats: RoundStats,
    prepared: list[tuple],
) -> list[tuple]:
    """Each client's simulated time on its tier's device (:mod:`hetfed.device_clock`, the
    bytes of its messages); under a ``round-deadline`` a straggler is left out (``drop``) or told
    to train the steps that fit (``partial``). Adds the round's simulated seconds."""
    kept, plans, late = [], [], []
    for client_id, sent, state, instruction in prepared:
        tier = tier_of(client_id)
        blocks = instruction.layers or tuple(range(clock.shape.blocks))
        down, up = wire.nbytes(state), wire.nbytes(sent.expected)
        plans.append(clock.plan(tier, sent.rank, blocks, down, up))
        if not plans[-1].steps:
            late.append(tier.name)
            continue
        if plans[-1].steps < clock.work.steps:
            instruction = replace(instruction, local_steps=plans[-1].steps)
        kept.append((client_id, sent, state, instruction))
    stats.simulated_seconds += clock.round_seconds(plans)
    stats.stragglers += len(late)
    if late:
        log(WARNING, "round %d: %d straggler(s) left out, they would miss the %g s deadline "
            "(tiers %s)", server_round, len(late), clock.deadline, ", ".join(late))  # fmt: skip
    return kept


def check_requirements(strategy: LoRAStrategy) -> None:
    """The settings a method declares it needs (``requires``, server examples), or a
    ConfigError naming the key, when the strategy is built (before any training)."""
    for key, (value, why) in strategy.requires.items():
        if setting(strategy.settings, key) != value:
            found = setting(strategy.settings, key)
            raise ConfigError(key, found, f"{value} for {strategy.name}: {why}")
    check_server_examples(strategy, strategy.settings.data.server_examples)


def check_server_examples(strategy: LoRAStrategy, available: int) -> None:
    """A method that computes on the server split needs that many examples in it."""
    needed = strategy.server_examples_needed()
    if available < needed:
        raise ConfigError(
            "data.server-examples",
            available,
            f"an integer >= {needed}: {strategy.name} needs >= {needed} server examples for "
            "its server-side computation",
        )


@dataclass(frozen=True)
class RoundLoop:
    """What Flower's round loop is run with: the grid, the timeout and the ServerApp's
    callbacks, central evaluation and the end of each round (checkpoints)."""

    grid: Grid
    timeout: float
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None
    on_round_end: Callable[[int, ArrayRecord], None] | None

    def run(self, strategy: LoRAStrategy, result: Result, rounds: range) -> Result:
        """Round by round: train (but round 0, the initial model), evaluate on the clients
        (``fraction-evaluate``), evaluate centrally and call back."""
        for server_round in rounds:
            if server_round > 0:
                log(INFO, "")
                log(INFO, "[ROUND %s/%s]", server_round, rounds.stop - 1)
                new_arrays, metrics = strategy.train_round(
                    server_round, result.arrays, ConfigRecord(), self.grid, self.timeout
                )
                if new_arrays is not None:
                    result.arrays = new_arrays
                    result.train_metrics_clientapp[server_round] = metrics
                evaluated = self.evaluate_on_clients(strategy, server_round, result.arrays)
                if evaluated is not None:
                    result.evaluate_metrics_clientapp[server_round] = evaluated
            metrics = self.evaluate_fn(server_round, result.arrays) if self.evaluate_fn else None
            if metrics is not None:
                result.evaluate_metrics_serverapp[server_round] = metrics
            if self.on_round_end is not None and server_round > 0:
                self.on_round_end(server_round, result.arrays)
        return result

    def evaluate_on_clients(
        self, strategy: LoRAStrategy, server_round: int, arrays: ArrayRecord
    ) -> MetricRecord | None:
        """The round's federated evaluation of the global model (none unless
        ``fraction-evaluate`` > 0)."""
        config = ConfigRecord()
        messages = list(strategy.configure_evaluate(server_round, arrays, config, self.grid))
        if not messages:
            return None
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        return strategy.aggregate_evaluate(server_round, replies)
