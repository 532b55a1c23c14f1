"""A train message's work: load the sent adapter onto the base model, train locally, reply.

Imported by the ClientApp on its first train message, never for a budget query: it brings
PyTorch, transformers, peft and datasets. One process (a Ray worker in simulation, a
SuperNode's app process in deployment) keeps ONE frozen base model in a module-level cache and
swaps small adapters in and out; tokenized partitions are cached too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import lru_cache

from flwr.app import Context, Message, RecordDict

from client_apps.node_config import NODE_DATA, NUM_PARTITIONS, PARTITION_ID, client_id
from hetfed import adapter_state, seeds, wire
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.config import RunSettings, parse_run_config, require_runs_on
from hetfed.data import DataConfig, load_partition, load_splits, require_known_labels
from hetfed.models import cached_model, compute_device
from hetfed.rank_pruning import keep_rank, pruned_rank, tail_penalty, tail_score
from hetfed.training import Encoded, encode_split, train_steps


@dataclass
class Worker:
    """What a process keeps between calls: the base model with its adapters, and the data."""

    settings: RunSettings
    host: AdapterHost
    tokenizer: object
    label_names: list[str]


@lru_cache(maxsize=4)
def _worker(settings: RunSettings) -> Worker:
    require_runs_on(settings, compute_device())  # a CPU device refuses fp16 or a quantized base
    label_names = load_splits(settings.data).label_names
    model, tokenizer = cached_model(settings.model, len(label_names), seed=settings.seed)
    return Worker(settings, AdapterHost(model), tokenizer, label_names)


@lru_cache(maxsize=64)
def _encoded_partition(
    settings: RunSettings, data: DataConfig, partition: tuple[int, int] | None
) -> Encoded:
    worker = _worker(settings)
    if partition is None:
        dataset = load_splits(data).train
    else:
        dataset = load_partition(data, *partition)
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


def local_data(settings: RunSettings, node_config: dict) -> Encoded:
    """This node's training examples: its simulated partition, or its own data path."""
    data = settings.data
    if NODE_DATA in node_config:
        data = data.on_device(str(node_config[NODE_DATA]))
    partition = None
    if PARTITION_ID in node_config and NUM_PARTITIONS in node_config:
        partition = (int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS]))
    return _encoded_partition(settings, data, partition)


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


def local_seed(instruction: wire.TrainInstruction, context: Context) -> int:
    """The seed of a client's local steps (:func:`hetfed.seeds.local_seed`)."""
    return seeds.local_seed(instruction.seed, client_id(context))


def train_locally(msg: Message, context: Context) -> Message:
    """Load the sent adapter at the sent rank, train locally, return the adapter and metrics."""
    started = time.perf_counter()
    settings, _ = parse_run_config(context.run_config, strict=False)
    instruction = wire.TrainInstruction.from_record(msg.content[wire.CONFIG])
    rank, layers, pruning = instruction.rank, instruction.layers, instruction.pruning
    if wire.BUDGET in context.state:
        affordable = wire.BudgetReply.from_record(context.state[wire.BUDGET]).rank
        if rank > affordable:
            raise ValueError(f"sent rank {rank} exceeds this node's budget {affordable}")
    received = wire.from_record(msg.content[wire.ARRAYS])
    arrays = adapter_state.trainable(received)
    spec = received_spec(instruction, settings)
    data = local_data(settings, context.node_config)
    worker = _worker(settings)
    with worker.host.lock:
        model = worker.host.set_state(spec, arrays)
        built = worker.host.built_scaling(spec)
        if not all(math.isclose(s, spec.scaling, rel_tol=1e-9) for s in built):
            raise ValueError(  # peft must build what the server reads, before any training
                f"peft built scalings {sorted(built)} for adapter {spec.name}, "
                f"the server reads it at {spec.scaling}"
            )
        # FLoRA's merged base, if any
        worker.host.set_base_deltas(adapter_state.base_deltas(received))
        penalty, keep, score_before = None, rank, 0.0
        if pruning is not None:
            keep = keep_rank(rank, pruning.gamma)
            score_before = tail_score(_in_layers(arrays, layers), keep)
            penalty = tail_penalty(model, spec.name, keep, pruning.lam)
        with (
            worker.host.train_only_layers(spec, layers),
            worker.host.frozen_factors(spec, instruction.frozen),
        ):
            steps = instruction.local_steps or settings.train.local_steps  # fewer: a deadline
            work = replace(settings.train, local_steps=steps)
            result = train_steps(
                model, data, work, penalty=penalty, seed=local_seed(instruction, context)
            )
        state = _in_layers(worker.host.get_state(spec), layers)  # only what was trained
    if pruning is not None and tail_score(state, keep) < score_before:
        rank = pruned_rank(rank, pruning.gamma, pruning.min_rank)
        state = adapter_state.truncate_state(state, rank)
    reply = wire.TrainReply(
        num_examples=len(data),
        train_loss=result.loss,
        rank=rank,
        seconds=time.perf_counter() - started,
        bytes_down=wire.nbytes(received),
        bytes_up=wire.nbytes(state),
    )
    content = RecordDict({wire.ARRAYS: wire.to_record(state), wire.METRICS: reply.to_record()})
    return Message(content, reply_to=msg)
