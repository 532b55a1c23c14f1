"""What the measurements share: the workload, simulated nodes, processes of their own."""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import platform
import resource
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from client_apps.node_config import NUM_PARTITIONS, PARTITION_ID
from hetfed import wire
from hetfed.adapters import AdapterHost
from hetfed.config import RunSettings
from hetfed.data import load_partition, load_splits
from hetfed.models import build_classifier, load_tokenizer
from hetfed.profiles import DeviceProfiles, parse_profiles
from hetfed.training import Encoded, encode
from server_apps.run_plan import plan_run
from tooling import scenarios

DEFAULT_OUT = Path("results/bench/bench.json")
QUICKSTART = Path("scenarios/quickstart")
# Items 1, 2 and 4 run a variant of the scenario (by default the quickstart: model, data, tiers
# and ranks, local steps, batch size) with zeropad: HetLoRA's rank self-pruning would add a
# penalty to the local steps and change ranks between rounds, which the naive client of item 1
# and the plain loop of item 2 would have to copy.
WORKLOAD = {"strategy": "zeropad"}
QUICK_WORKLOAD = {**WORKLOAD, "model.name": "tiny-random-bert", "train.local-steps": 2}
# The train instructions a plain LoRA client follows (zeropad sends nothing else).


def act_as_flower_task() -> None:
    """Give this process a task identity, as Flower's runtime does for the ServerApp and
    ClientApp processes: Flower stamps every message it builds with it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's INFO log off (the strategies log every registration) while measuring."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def isolated(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a fresh process, so that its peak memory is its own.

    The process is forked from multiprocessing's fork server, not spawned from this one: on
    Linux a spawned child's ``ru_maxrss`` starts at its parent's peak (exec keeps the high-water
    mark), a child of the small fork server starts at the server's.
    """
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


class SimulatedNodes:
    """Flower's Grid interface over ``num_nodes`` in-process nodes, numbered as the Simulation
    Engine numbers them (random 63-bit node ids, partitions 0..N-1), that answer budget queries
    as the ClientApp does in simulation: the tier the profiles (sent in the query) assign to the
    node's partition, its rank, and the partition as client id.

    Every reply goes through Flower's wire format (protobuf) and back, as through a SuperLink,
    so the server keeps its own copies of what it keeps. Train messages are not run here.
    """

    def __init__(self, num_nodes: int, run_config: dict[str, Any], seed: int = 0) -> None:
        ids = np.random.default_rng(seed).choice(2**63 - 1, size=num_nodes, replace=False) + 1
        self.partition = {int(node): i for i, node in enumerate(ids)}
        self.run_config = run_config

    def get_node_ids(self) -> list[int]:
        return list(self.partition)

    def context(self, node_id: int) -> Context:
        """Node ``node_id``'s context, as the Simulation Engine gives it to the ClientApp."""
        node_config = {PARTITION_ID: self.partition[node_id], NUM_PARTITIONS: len(self.partition)}
        return Context(
            run_id=1,
            node_id=node_id,
            node_config=node_config,
            state=RecordDict(),
            run_config=self.run_config,
        )

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            if msg.metadata.message_type != MessageType.QUERY:
                raise ValueError("SimulatedNodes answers budget queries only")
            profiles = _profiles(str(msg.content[wire.CONFIG][wire.PROFILES]))
            partition = self.partition[msg.metadata.dst_node_id]
            tier = profiles.tier_for_partition(partition, len(self.partition))
            budget = wire.BudgetReply(tier.name, tier.rank, partition).to_record()
            reply = Message(RecordDict({wire.BUDGET: budget}), reply_to=msg)
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


@functools.lru_cache(maxsize=4)
def _profiles(text: str) -> DeviceProfiles:
    return parse_profiles(text)


@dataclass
class Workload:
    """Train messages of a scenario's strategy with the contexts of the nodes they go to."""

    settings: RunSettings
    host: AdapterHost  # the base model that made the initial global adapter
    calls: list[tuple[int, Message, Context]]  # (round, message, context)


def client_workload(
    scenario: str | Path, overrides: Sequence[str] = (), rounds: int = 1
) -> Workload:
    """The train messages the scenario's strategy sends in rounds 1..``rounds`` (its real
    ``configure_train`` over :class:`SimulatedNodes`; ``overrides`` as ``hetfed run -c``), every
    round from the initial global adapter the ServerApp starts from: a benchmark needs the same
    work per round, not the learning. The nodes are the scenario's num-supernodes.
    """
    act_as_flower_task()
    run_config = scenarios.scenario_run_config(scenario, list(overrides))
    plan = plan_run(run_config, project_dir=scenario)
    settings = plan.settings
    strategy = plan.build_strategy()
    num_nodes = scenarios.simulation_settings(scenario)["num-supernodes"]
    nodes = SimulatedNodes(num_nodes, run_config, settings.seed)
    num_labels = len(load_splits(settings.data).label_names)
    host = AdapterHost(build_classifier(settings.model, num_labels, settings.seed)[0])
    initial = wire.to_record(host.initial_state(strategy.global_spec(), seed=settings.seed))
    calls = [
        (server_round, msg, nodes.context(msg.metadata.dst_node_id))
        for server_round in range(1, rounds + 1)
        for msg in strategy.configure_train(server_round, initial, ConfigRecord(), nodes)
    ]
    return Workload(settings, host, calls)


@functools.lru_cache(maxsize=64)
def tokenized_partition(settings: RunSettings, partition: int, num_partitions: int) -> Encoded:
    """A node's tokenized partition as the ClientApp encodes it, without the ClientApp's cached
    model (the tokenizer and the partitions are cached per process, as the ClientApp does)."""
    dataset = load_partition(settings.data, partition, num_partitions)
    return encode(
        list(dataset["text"]),
        list(dataset["label"]),
        load_tokenizer(settings.model.name),
        settings.model.max_length,
    )


def partition_of(settings: RunSettings, context: Context) -> Encoded:
    config = context.node_config
    return tokenized_partition(settings, int(config[PARTITION_ID]), int(config[NUM_PARTITIONS]))


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "flwr": flwr.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            (line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line),
            None,
        )
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    return info
