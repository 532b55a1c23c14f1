"""A train message's work: load the sent adapter onto the base model, train locally, reply.

Imported by the ClientApp on its first train message, never for a budget query: it brings
PyTorch, transformers, peft and datasets. One process (a Ray worker in simulation, a
SuperNode's app process in deployment) keeps ONE frozen base model in a module-level cache and
swaps small adapters in and out; tokenized partitions are cached too.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from flwr.app import Context, Message, RecordDict

from client_apps.node_config import NODE_DATA, NUM_PARTITIONS, PARTITION_ID, client_id
from client_apps.personal_state import PersonalStore, split_personal
from hetfed import adapter_state, seeds, wire
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.budgets import check_sent_rank
from hetfed.config import RunSettings, parse_run_config, require_runs_on
from hetfed.data import load_partition, load_splits, local_split, require_known_labels
from hetfed.data_config import TRAIN, DataConfig
from hetfed.models import ModelConfig, cached_model, compute_device
from hetfed.rank_pruning import keep_rank, pruned_rank, tail_penalty, tail_score
from hetfed.training import Encoded, TrainResult, encode_split, evaluate, train_steps


@dataclass
class Worker:
    """What a process keeps between calls: the base model with its adapters, and the data."""

    host: AdapterHost
    tokenizer: object
    label_names: list[str]


def worker_for(settings: RunSettings) -> Worker:
    """This process's worker for a run's base model (one per base: runs whose other settings
    differ share it)."""
    require_runs_on(settings, compute_device())  # a CPU device refuses fp16 or a quantized base
    return _worker(settings.model, settings.data, settings.seed)


@lru_cache(maxsize=4)
def _worker(model_config: ModelConfig, data: DataConfig, seed: int) -> Worker:
    label_names = load_splits(data).label_names
    host, tokenizer = _host(model_config, len(label_names), seed)
    return Worker(host, tokenizer, label_names)


@lru_cache(maxsize=4)
def _host(model_config: ModelConfig, num_labels: int, seed: int) -> tuple[AdapterHost, object]:
    """One adapter host per cached base model (:func:`hetfed.models.cached_model`)."""
    model, tokenizer = cached_model(model_config, num_labels, seed=seed)
    return AdapterHost(model), tokenizer


@lru_cache(maxsize=64)
def _encoded_partition(
    settings: RunSettings, data: DataConfig, partition: tuple[int, int] | None, part: str
) -> Encoded:
    worker = worker_for(settings)
    if partition is None:
        dataset = load_splits(data).train
    else:
        dataset = load_partition(data, *partition)
    if data.local_test_fraction > 0:  # federated evaluation: the client's own held-out splits
        dataset = local_split(dataset, data, partition[0] if partition else 0)[part]
    labels = list(dataset["label"])
    if data != settings.data:  # a device's own data: number its labels as the server does
        labels = server_label_ids(settings, data, labels)
    return encode_split(settings.model, dataset, worker.label_names, worker.tokenizer, labels)


def server_label_ids(settings: RunSettings, data: DataConfig, labels: list[int]) -> list[int]:
    """Map label ids of a device's own data to the run's label ids, by label name."""
    run_names = load_splits(settings.data).label_names
    local_names = load_splits(data).label_names
    what = "data whose labels are among the run's"
    require_known_labels(local_names, run_names, "node-config data-path", data.source, what)
    to_run = [run_names.index(name) for name in local_names]
    return [to_run[label] for label in labels]


def local_data(settings: RunSettings, node_config: dict, part: str = TRAIN) -> Encoded:
    """This node's training examples (or, ``part`` test or validation, its local held-out
    split): from its simulated partition, or its own data path."""
    data = settings.data
    if NODE_DATA in node_config:
        data = data.on_device(str(node_config[NODE_DATA]))
    partition = None
    if PARTITION_ID in node_config and NUM_PARTITIONS in node_config:
        partition = (int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS]))
    return _encoded_partition(settings, data, partition, part)


def _in_layers(state: dict, layers: tuple[int, ...] | None) -> dict:
    return state if layers is None else adapter_state.restrict_to_layers(state, layers)


def received_spec(instruction: wire.TrainInstruction, settings: RunSettings) -> LoraSpec:
    """The adapter a train instruction asks for: its rank, alpha and scaling rule on the run's
    LoRA modules. A scaling the instruction states but this spec would not give is refused."""
    rank, alpha = instruction.rank, instruction.lora_alpha
    if not (rank >= 1 and math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"cannot build a LoRA adapter of rank {rank}, alpha {alpha}: "
            "allowed are rank >= 1 and a finite alpha > 0"
        )
    lora = settings.lora
    spec = LoraSpec(rank, alpha, lora.modules(), lora.dropout, instruction.lora_rslora)
    if not math.isclose(spec.scaling, instruction.lora_scaling, rel_tol=1e-9):
        raise ValueError(
            f"the server reads this adapter at scaling {instruction.lora_scaling}, but rank "
            f"{rank}, alpha {alpha}, rslora {spec.rslora} give {spec.scaling}"
        )
    return spec


@dataclass(frozen=True)
class TrainJob:
    """A train message's work as the ClientApp hands it to a trainer: what was sent and who
    this node is (picklable: a packed trainer receives it through Ray)."""

    settings: RunSettings
    instruction: wire.TrainInstruction
    received: dict[str, np.ndarray]
    node_config: dict
    client_id: int
    personal: dict[str, np.ndarray] = field(default_factory=dict)  # its own, kept across rounds

    @classmethod
    def from_message(cls, msg: Message, context: Context, evaluating: bool = False) -> TrainJob:
        """The job of a train (or evaluate) message, with this client's personal factors of an
        earlier round (of this round when it evaluates); a rank above its budget is refused."""
        settings, _ = parse_run_config(context.run_config, strict=False)
        instruction = wire.TrainInstruction.from_record(msg.content[wire.CONFIG])
        if wire.BUDGET in context.state:
            budget = wire.BudgetReply.from_record(context.state[wire.BUDGET])
            check_sent_rank(instruction.rank, budget.rank)
        received = wire.from_record(msg.content[wire.ARRAYS])
        job = cls(settings, instruction, received, dict(context.node_config), client_id(context))
        if instruction.personal:
            through = instruction.server_round - (0 if evaluating else 1)
            job = replace(job, personal=job.personal_store().latest(through))
        return job

    def personal_store(self) -> PersonalStore:
        """Where this client keeps its personal factors of this run."""
        key = self.instruction.personal_key
        return PersonalStore.of(self.settings.results_dir, self.node_config, key, self.client_id)

    @property
    def seed(self) -> int:
        """The seed of the client's local steps (:func:`hetfed.seeds.local_seed`)."""
        return seeds.local_seed(self.instruction.seed, self.client_id)

    @property
    def base_deltas(self) -> dict[str, np.ndarray]:
        """FLoRA's merged base weights, if any: the base this client trains on."""
        return adapter_state.base_deltas(self.received)

    @property
    def steps(self) -> int:
        """Local steps this round: the run's, or fewer (a straggler under a deadline)."""
        return self.instruction.local_steps or self.settings.train.local_steps


@dataclass(frozen=True)
class JobResult:
    """What a client's training gives back: the trained arrays, at the rank it kept."""

    state: dict[str, np.ndarray]
    rank: int
    num_examples: int
    train_loss: float


class LocalWork:
    """One client's job on a process's base model: load its adapter, freeze what it must not
    train, and read back what it trained (pruned where HetLoRA's rule says so). Training in
    between is :func:`~hetfed.training.train_steps` alone or a pack's
    (:mod:`hetfed.packed_training`), ``slot`` naming its adapter there."""

    def __init__(self, job: TrainJob, slot: int | None = None) -> None:
        self.job = job
        self.worker = worker_for(job.settings)
        self.spec = replace(received_spec(job.instruction, job.settings), slot=slot)
        self.arrays = adapter_state.trainable(job.received) | job.personal
        self.data = local_data(job.settings, job.node_config)
        self.penalty = None
        self.keep, self.score_before = job.instruction.rank, 0.0

    def load(self) -> None:
        """Load the sent arrays into this client's adapter (the host's lock held)."""
        host, spec = self.worker.host, self.spec
        personal = self.job.instruction.personal
        if personal and not self.job.personal:  # its first round: peft's initial values
            fresh = host.initial_state(spec, seed=self.job.seed)
            self.arrays = self.arrays | split_personal(fresh, personal)[1]
        model = host.set_state(spec, self.arrays)
        built = host.built_scaling(spec)
        if not all(math.isclose(s, spec.scaling, rel_tol=1e-9) for s in built):
            raise ValueError(  # peft must build what the server reads, before any training
                f"peft built scalings {sorted(built)} for adapter {spec.name}, "
                f"the server reads it at {spec.scaling}"
            )
        pruning = self.job.instruction.pruning
        if pruning is not None:
            self.keep = keep_rank(self.job.instruction.rank, pruning.gamma)
            layers = self.job.instruction.layers
            self.score_before = tail_score(_in_layers(self.arrays, layers), self.keep)
            self.penalty = tail_penalty(model, spec.name, self.keep, pruning.lam)

    def frozen_parts(self) -> ExitStack:
        """Freeze the LoRA modules outside the sent layers and the sent frozen factors."""
        host, instruction = self.worker.host, self.job.instruction
        stack = ExitStack()
        stack.enter_context(host.train_only_layers(self.spec, instruction.layers))
        stack.enter_context(host.frozen_factors(self.spec, instruction.frozen))
        return stack

    def result(self, trained: TrainResult) -> JobResult:
        """Only what was trained, pruned to HetLoRA's smaller rank when its tail shrank."""
        instruction = self.job.instruction
        state = _in_layers(self.worker.host.get_state(self.spec), instruction.layers)
        rank, pruning = instruction.rank, instruction.pruning
        if pruning is not None and tail_score(state, self.keep) < self.score_before:
            rank = pruned_rank(rank, pruning.gamma, pruning.min_rank)
            state = adapter_state.truncate_state(state, rank)
        return JobResult(state, rank, len(self.data), trained.loss)


def run_alone(job: TrainJob) -> JobResult:
    """Train one client's job on this process's base model, by itself."""
    work = LocalWork(job)
    host = work.worker.host
    with host.lock:
        work.load()
        host.set_base_deltas(job.base_deltas)
        with work.frozen_parts():
            train = replace(job.settings.train, local_steps=job.steps)
            trained = train_steps(
                host.peft_model, work.data, train, penalty=work.penalty, seed=job.seed
            )
        return work.result(trained)


def reply_message(msg: Message, job: TrainJob, result: JobResult, started: float) -> Message:
    """The train reply: the trained arrays and a :class:`~hetfed.wire.TrainReply`; personal
    factors stay on the client, kept for its next round."""
    state, personal = split_personal(result.state, job.instruction.personal)
    if personal:
        job.personal_store().save(job.instruction.server_round, personal)
    reply = wire.TrainReply(
        num_examples=result.num_examples,
        train_loss=result.train_loss,
        rank=result.rank,
        seconds=time.perf_counter() - started,
        bytes_down=wire.nbytes(job.received),
        bytes_up=wire.nbytes(state),
    )
    arrays = wire.to_record(state)
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: reply.to_record()})
    return Message(content, reply_to=msg)


def evaluate_locally(msg: Message, context: Context) -> Message:
    """Federated evaluation: the sent global adapter, at this client's rank, scored on its own
    held-out splits of the round (:meth:`~hetfed.config.RunSettings.client_splits`), with the
    client's own personal factors where it keeps some; the reply is a
    :class:`~hetfed.wire.EvaluateReply`."""
    job = TrainJob.from_message(msg, context, evaluating=True)  # a rank above budget is refused
    settings = job.settings
    parts = settings.client_splits(job.instruction.server_round)
    held_out = {part: local_data(settings, job.node_config, part) for part in parts}
    work = LocalWork(job)
    host, train = work.worker.host, settings.train
    with host.lock:
        work.load()
        host.set_base_deltas(job.base_deltas)
        scores = [
            evaluate(host.peft_model, held_out[part], train.eval_batch_size, train.precision)
            for part in parts
        ]
    (accuracy, loss), *on_test = scores
    test_accuracy, test_loss = on_test[0] if on_test else (None, None)
    reply = wire.EvaluateReply(len(held_out[parts[0]]), accuracy, loss, test_accuracy, test_loss)
    return Message(RecordDict({wire.METRICS: reply.to_record()}), reply_to=msg)


def train_locally(msg: Message, context: Context) -> Message:
    """Load the sent adapter at the sent rank, train locally, return the adapter and metrics."""
    started = time.perf_counter()
    job = TrainJob.from_message(msg, context)
    return reply_message(msg, job, run_alone(job), started)
