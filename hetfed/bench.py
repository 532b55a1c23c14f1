"""``hetfed bench``: the cost model of a simulated federation, measured side by side in one run.

Four measurements, each a plain function (``hetfed bench --items 1,3`` picks some):

1. :func:`client_throughput` - client updates per second and peak memory of hetfed's ClientApp
   (one cached base model per process, adapters swapped) against the naive pattern of Flower's
   LLM examples (:func:`naive_train`: the base model rebuilt from disk and wrapped by peft on
   every call), on the quickstart's clients, each variant in its own process.
2. :func:`framework_overhead` - wall time of the training part of simulated rounds (the
   ``train_seconds`` of ``metrics.jsonl``, through ``hetfed run`` and Flower's Simulation Engine)
   against the sum of the bare local training steps of the same clients, as a ratio.
3. :func:`server_aggregation` - time and peak memory (tracemalloc) of every rank strategy's
   ``aggregate`` on 100 random client replies of SmolLM2-135M's shapes, and
   :func:`flexlora_large` - FlexLoRA's factored SVD against the dense sum and full SVD on one
   transformer block of 7B-class shapes.
4. :func:`server_memory` - bytes the strategy holds after registering 500 and 5,000 clients
   (budget queries over :class:`SimulatedNodes`), and the bytes per client between the two.

``--quick`` runs each with tiny sizes (the tiny random BERT, two local steps, a few clients,
small shapes): it checks that the machinery works and its figures mean nothing. The results are
printed as Markdown tables and written as JSON (``--out``, default ``results/bench/bench.json``),
after every item, so a long run keeps what it measured. ``docs/benchmarks.md`` reads them.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flwr
import numpy as np
import tomli_w
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.config import flatten_dict, unflatten_dict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from client_apps.lora_client import (
    NUM_PARTITIONS,
    PARTITION_ID,
    local_seed,
    received_spec,
    train,
)
from hetfed import cli, wire
from hetfed import lora_algebra as la
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.config import RunSettings, parse_run_config
from hetfed.data import load_partition, load_splits
from hetfed.errors import ConfigError, HetfedError
from hetfed.models import build_classifier, load_tokenizer
from hetfed.profiles import DeviceProfiles, parse_profiles
from hetfed.registry import load_strategy, strategy_names
from hetfed.results import read_metrics
from hetfed.run_plan import plan_run
from hetfed.training import Encoded, encode, train_steps
from hetfed.wire import State
from strategies.base import ClientUpdate, LoRAStrategy
from strategies.layer_base import LayerStrategy

QUICKSTART = Path("scenarios/quickstart")
# Items 1, 2 and 4 run a variant of the scenario (by default the quickstart: model, data, tiers
# and ranks, local steps, batch size) with zeropad: HetLoRA's rank self-pruning would add a
# penalty to the local steps and change ranks between rounds, which the naive client of item 1
# and the plain loop of item 2 would have to copy.
WORKLOAD = {"strategy": "zeropad"}
QUICK_WORKLOAD = {**WORKLOAD, "model.name": "tiny-random-bert", "train.local-steps": 2}
# The train instructions a plain LoRA client follows (zeropad sends nothing else).
PLAIN_TRAIN_KEYS = {
    wire.SERVER_ROUND,
    wire.RANK,
    wire.LORA_ALPHA,
    wire.LORA_RSLORA,
    wire.LORA_SCALING,
    wire.SEED,
}

# (d_out, d_in) of the linear layers of one transformer block (LLaMA names).
SMOLLM2_135M_BLOCK = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
SMOLLM2_135M_LAYERS = 30
LLAMA_7B_BLOCK = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
# Quick mode: the same layouts at 1/24 (SmolLM2) and 1/64 (7B) of the widths.
QUICK_SMOLLM2_BLOCK = {m: (o // 24, i // 24) for m, (o, i) in SMOLLM2_135M_BLOCK.items()}
QUICK_7B_BLOCK = {m: (o // 64, i // 64) for m, (o, i) in LLAMA_7B_BLOCK.items()}
# helora-kd is measured without its server model: FedAvg per rank group, no distillation.
STRATEGY_OVERRIDES = {"helora-kd": {"helora-kd.epochs": 0}}
STRATEGY_NOTES = {"helora-kd": "FedAvg per rank group only: no server model"}
LORA_ALPHA = 16.0
DEFAULT_OUT = Path("results/bench/bench.json")
ITEMS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Sizes:
    """How big each item is: the issue's sizes, or tiny ones (``--quick``)."""

    workload: dict[str, Any] = field(default_factory=lambda: WORKLOAD)  # scenario variant
    client_updates: int = 20  # item 1: calls per variant
    overhead_rounds: int = 3  # item 2
    aggregation_clients: int = 100  # item 3
    aggregation_ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    aggregation_block: dict[str, tuple[int, int]] = field(
        default_factory=lambda: SMOLLM2_135M_BLOCK
    )
    aggregation_layers: int = SMOLLM2_135M_LAYERS
    large_clients: int = 100
    large_ranks: tuple[int, ...] = (4, 8, 16)
    large_block: dict[str, tuple[int, int]] = field(default_factory=lambda: LLAMA_7B_BLOCK)
    populations: tuple[int, ...] = (500, 5000)  # item 4


FULL = Sizes()
QUICK = Sizes(
    workload=QUICK_WORKLOAD,
    client_updates=4,
    overhead_rounds=2,
    aggregation_clients=8,
    aggregation_ranks=(2, 4, 8),
    aggregation_block=QUICK_SMOLLM2_BLOCK,
    aggregation_layers=2,
    large_clients=8,
    large_block=QUICK_7B_BLOCK,
    populations=(20, 200),
)


# --------------------------------------------------------------------------- plumbing


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


def scenario_variant(
    base: str | Path,
    folder: str | Path,
    config: dict[str, Any],
    simulation: dict[str, Any] | None = None,
) -> Path:
    """A copy of scenario ``base`` in ``folder`` with the run-config values of ``config`` and
    the ``[tool.hetfed.simulation]`` settings of ``simulation`` replaced; choosing another
    ``strategy`` drops the options of the other registered strategies (the run config rejects
    them). The profile file is copied along; a relative ``data.source`` stays relative to the
    directory the run starts from."""
    base, folder = Path(base), Path(folder)
    doc = cli.read_scenario(base)
    app = doc["tool"]["flwr"]["app"]
    flat = {**flatten_dict(app.get("config", {})), **config}
    others = set(strategy_names()) - {flat.get("strategy", RunSettings.strategy)}
    app["config"] = unflatten_dict({k: v for k, v in flat.items() if k.split(".")[0] not in others})
    doc["tool"].setdefault("hetfed", {}).setdefault("simulation", {}).update(simulation or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc))
    profiles = Path(flat.get("profiles", RunSettings.profiles))
    if not profiles.is_absolute():
        shutil.copyfile(base / profiles, folder / profiles)
    return folder


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
            budget = {wire.TIER: tier.name, wire.RANK: tier.rank, wire.CLIENT_ID: partition}
            reply = Message(RecordDict({wire.BUDGET: ConfigRecord(budget)}), reply_to=msg)
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
    run_config = cli.scenario_run_config(scenario, list(overrides))
    plan = plan_run(run_config, project_dir=scenario)
    settings = plan.settings
    strategy = plan.build_strategy()
    num_nodes = cli.simulation_settings(scenario)["num-supernodes"]
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


def _partition_of(settings: RunSettings, context: Context) -> Encoded:
    config = context.node_config
    return tokenized_partition(settings, int(config[PARTITION_ID]), int(config[NUM_PARTITIONS]))


# --------------------------------------------------------------------------- item 1


def naive_train(msg: Message, context: Context) -> Message:
    """A ClientApp train function in the pattern of Flower's LLM examples: every call builds the
    base model from disk (weights and tokenizer) and wraps it with peft, then loads the received
    adapter, trains and replies.

    It does the same work as hetfed's :func:`~client_apps.lora_client.train` (same adapter, data,
    local steps and seed) but keeps no model between calls; only the tokenized partitions are
    cached, as hetfed caches them, so that the comparison is about the model alone. Messages
    with more than plain LoRA training (rank pruning, layers, base deltas) are refused.
    """
    received = wire.from_record(msg.content[wire.ARRAYS])
    extra = sorted(set(msg.content[wire.CONFIG]) - PLAIN_TRAIN_KEYS)
    if extra or wire.base_deltas(received):
        raise ValueError(f"naive_train trains plain LoRA only; the message asks for {extra}")
    settings, _ = parse_run_config(context.run_config, strict=False)
    num_labels = len(load_splits(settings.data).label_names)
    model, _ = build_classifier(settings.model, num_labels, seed=settings.seed)
    spec = received_spec(msg, settings)
    host = AdapterHost(model)
    data = _partition_of(settings, context)
    result = train_steps(
        host.set_state(spec, wire.trainable(received)),
        data,
        settings.train,
        seed=local_seed(msg, context),
    )
    metrics = MetricRecord(
        {wire.NUM_EXAMPLES: len(data), wire.TRAIN_LOSS: result.loss, wire.RANK: spec.rank}
    )
    return Message(
        RecordDict({wire.ARRAYS: wire.to_record(host.get_state(spec)), wire.METRICS: metrics}),
        reply_to=msg,
    )


CLIENT_VARIANTS: dict[str, Callable[[Message, Context], Message]] = {
    "hetfed": train,
    "naive": naive_train,
}


def measure_client_calls(variant: str, calls: list[tuple[Message, Context]]) -> dict[str, Any]:
    """Run the calls through one variant's train function in this process; its figures.

    Timed from the first call to the last reply (imports excluded, the model's first load
    included); peak memory is this process's ``ru_maxrss``.
    """
    act_as_flower_task()
    train_function = CLIENT_VARIANTS[variant]
    seconds, losses = [], []
    with quiet_flower():
        for msg, context in calls:
            started = time.perf_counter()
            reply = train_function(msg, context)
            seconds.append(time.perf_counter() - started)
            losses.append(float(reply.content[wire.METRICS][wire.TRAIN_LOSS]))
    total = sum(seconds)
    return {
        "updates": len(calls),
        "seconds": total,
        "updates_per_second": len(calls) / total,
        "first_update_seconds": seconds[0],
        "later_update_seconds": float(np.mean(seconds[1:])) if len(seconds) > 1 else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "train_losses": losses,
    }


def client_throughput(scenario: str | Path, updates: int = 20) -> dict[str, Any]:
    """Client updates per second and peak memory: hetfed's ClientApp against the naive pattern.

    The workload is the scenario's (``hetfed bench``: the quickstart's all-MiniLM-L6-v2, BBC
    News, tiers, local steps and batch size, with zeropad) with every client sampled: the real
    train messages of round 1 (:func:`client_workload`) with the nodes' contexts, repeated in
    order until ``updates`` calls. Each variant runs all calls in its own fresh process
    (:func:`isolated`):
    ``hetfed`` calls the ClientApp's ``train`` (one cached base model, adapters swapped),
    ``naive`` calls :func:`naive_train` (the base model rebuilt on every call).

    updates/s = calls / (wall time from the first call to the last reply); peak memory is the
    process's peak RSS. ``speedup`` = updates/s of hetfed / of naive (target >= 2);
    ``max_train_loss_difference`` shows that both did the same work.
    """
    workload = client_workload(scenario, ["fraction-train=1.0"])
    calls = [(msg, context) for _, msg, context in workload.calls]
    calls = [calls[i % len(calls)] for i in range(updates)]
    variants = {
        variant: isolated(measure_client_calls, variant, calls) for variant in CLIENT_VARIANTS
    }
    hetfed, naive = variants["hetfed"], variants["naive"]
    return {
        "scenario": str(scenario),
        "settings": {
            "model": workload.settings.model.name,
            "data": workload.settings.data.source,
            "local_steps": workload.settings.train.local_steps,
            "batch_size": workload.settings.train.batch_size,
            "ranks": sorted({int(m.content[wire.CONFIG][wire.RANK]) for m, _ in calls}),
        },
        "variants": variants,
        "speedup": hetfed["updates_per_second"] / naive["updates_per_second"],
        "peak_rss_ratio_naive_over_hetfed": naive["peak_rss_bytes"] / hetfed["peak_rss_bytes"],
        "max_train_loss_difference": float(
            np.max(np.abs(np.subtract(hetfed["train_losses"], naive["train_losses"])))
        ),
    }


# --------------------------------------------------------------------------- item 2


def plain_training_seconds(
    scenario: str | Path, rounds: int, threads: int
) -> dict[int, list[float]]:
    """Seconds of the bare local training steps of every client of rounds 1..``rounds``.

    The same clients, ranks, data, local steps and seeds as the simulated run (the strategy's
    sampling is seeded): for each train message its adapter is loaded into one peft-wrapped base
    model (not timed), then only :func:`hetfed.training.train_steps` (forward, backward, AdamW)
    is timed, with ``threads`` torch threads. Returns the seconds per client by round.
    """
    torch.set_num_threads(threads)
    with quiet_flower():
        workload = client_workload(scenario, rounds=rounds)
    settings = workload.settings
    seconds: dict[int, list[float]] = {}
    for server_round, msg, context in workload.calls:
        received = wire.trainable(wire.from_record(msg.content[wire.ARRAYS]))
        model = workload.host.set_state(received_spec(msg, settings), received)
        data = _partition_of(settings, context)
        result = train_steps(model, data, settings.train, seed=local_seed(msg, context))
        seconds.setdefault(server_round, []).append(result.seconds)
    return seconds


def overhead_ratios(
    simulated: dict[int, float], plain: dict[int, list[float]]
) -> dict[str, float | None]:
    """train_seconds / sum of the plain steps, over all rounds and over rounds 2.. (warm: the
    first round also loads the base model and the data in the workers and asks the budgets)."""
    later = [r for r in simulated if r > 1]

    def ratio(rounds: Iterable[int]) -> float | None:
        rounds = list(rounds)
        bare = sum(sum(plain[r]) for r in rounds)
        return sum(simulated[r] for r in rounds) / bare if rounds else None

    return {"all_rounds": ratio(simulated), "rounds_2_on": ratio(later)}


def framework_overhead(
    scenario: str | Path,
    rounds: int = 3,
    cpus: int = 1,
    work_dir: str | Path = DEFAULT_OUT.parent / "overhead",
) -> dict[str, Any]:
    """Framework overhead: the training part of simulated rounds against the bare steps.

    Runs a variant of the scenario (:func:`scenario_variant` in ``work_dir/scenario``:
    ``rounds`` rounds, results in ``work_dir/run``, one Ray worker with ``cpus`` CPUs:
    client-resources-num-cpus = init-args-num-cpus = ``cpus``) with ``hetfed run`` through
    Flower's Simulation Engine, and reads each round's ``train_seconds`` (configure_train start
    to aggregate_train end: sampling, messages, the SuperLink, Ray, the ClientApp, validation,
    aggregation). Then :func:`plain_training_seconds` times the bare steps of the same clients
    with ``cpus`` torch threads, in a process of its own. ratio = train_seconds / sum of the
    bare steps (target <= 1.15), over all rounds and over rounds 2.. The run's log is
    ``work_dir/flwr-run.log``; the run uses this environment's FLWR_* variables (FLWR_HOME,
    FLWR_LOCAL_*_PORT) as ``hetfed run`` does.
    """
    work_dir = Path(work_dir).resolve()
    run_dir = work_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    variant = scenario_variant(
        scenario,
        work_dir / "scenario",
        {"num-server-rounds": rounds, "results-dir": str(run_dir)},
        {"client-resources-num-cpus": cpus, "init-args-num-cpus": cpus},
    )
    log_path = work_dir / "flwr-run.log"
    started = time.perf_counter()
    with log_path.open("w") as log, contextlib.redirect_stdout(log):
        code = cli.run(variant, [])
    wall = time.perf_counter() - started
    if code != 0:
        raise HetfedError(f"the simulated run failed (exit code {code}); see {log_path}")
    records = read_metrics(run_dir)
    simulated = {r["round"]: r["train_seconds"] for r in records if r["round"] > 0}
    plain = isolated(plain_training_seconds, variant, rounds, cpus)
    return {
        "scenario": str(scenario),
        "cpus": cpus,
        "run_seconds": wall,
        "rounds": [
            {
                "round": r,
                "clients": len(plain[r]),
                "train_seconds": simulated[r],
                "plain_steps_seconds": sum(plain[r]),
                "ratio": simulated[r] / sum(plain[r]),
            }
            for r in sorted(simulated)
        ],
        "ratio": overhead_ratios(simulated, plain),
        "log": str(log_path),
    }


# --------------------------------------------------------------------------- item 3


def model_modules(block: dict[str, tuple[int, int]], layers: int) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every LoRA module of a ``layers``-block model (``model.layers.{i}.*``)."""
    return {
        f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in block.items()
    }


def rank_profiles(ranks: Sequence[int]) -> DeviceProfiles:
    """One tier per rank (``r4``, ``r8``, ...), each given an equal share of the clients."""
    lines = [f"  r{rank}: {{rank: {rank}}}" for rank in ranks]
    return parse_profiles("tiers:\n" + "\n".join(lines) + "\n", "rank tiers")


class RandomAdapters:
    """Stands in for the server's :class:`~hetfed.adapters.AdapterHost` where a strategy asks for
    its initial adapter: random float32 factors of the given module shapes, no model."""

    def __init__(self, modules: dict[str, tuple[int, int]]) -> None:
        self.modules = modules

    def initial_state(self, spec: LoraSpec, seed: int) -> State:
        rng = np.random.default_rng(seed)
        state = {}
        for module, (d_out, d_in) in self.modules.items():
            state[f"{module}.lora_A.weight"] = rng.standard_normal((spec.rank, d_in), np.float32)
            state[f"{module}.lora_B.weight"] = rng.standard_normal((d_out, spec.rank), np.float32)
        return state


def rank_strategy(
    name: str, modules: dict[str, tuple[int, int]], profiles: DeviceProfiles
) -> LoRAStrategy:
    """Registered strategy ``name`` with its default options, bound to random adapters."""
    cls = load_strategy(name)
    run_config = {"strategy": name, "data.server-examples": 1, **STRATEGY_OVERRIDES.get(name, {})}
    settings, options = parse_run_config(run_config, cls.options_class, options_prefix=name)
    strategy = cls(settings, profiles, options)
    # No model: rank strategies ask the server only for their initial adapter.
    strategy.server = SimpleNamespace(host=RandomAdapters(modules))
    return strategy


def random_updates(
    strategy: LoRAStrategy, global_state: State, clients: list[int], seed: int
) -> list[ClientUpdate]:
    """One reply per client: random arrays of exactly the shapes the strategy sends it."""
    rng = np.random.default_rng(seed)
    updates = []
    for client in clients:
        rank = strategy.client_rank(client)
        sent = wire.trainable(strategy.distribute(global_state, rank))
        state = {key: rng.standard_normal(value.shape, np.float32) for key, value in sent.items()}
        metrics = {wire.TRAIN_LOSS: 1.0}
        scaling = strategy.source_scaling(rank)  # as the base converts an accepted reply
        updates.append(
            ClientUpdate(client, int(rng.integers(10, 1000)), rank, state, metrics, scaling)
        )
    return updates


def traced(function: Callable[..., Any], *args: Any) -> tuple[Any, float, int]:
    """``function(*args)``, its wall time and its peak of traced (Python and numpy) memory."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = function(*args)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, seconds, peak


def rank_strategy_names() -> list[str]:
    """Registered strategies that aggregate ranks (layer strategies and broken plugins left out)."""
    names = []
    for name in strategy_names():
        try:
            cls = load_strategy(name)
        except ConfigError:
            continue
        if not issubclass(cls, LayerStrategy):
            names.append(name)
    return names


def server_aggregation(
    num_clients: int = 100,
    ranks: Sequence[int] = (4, 8, 16, 32, 64),
    block: dict[str, tuple[int, int]] = SMOLLM2_135M_BLOCK,
    layers: int = SMOLLM2_135M_LAYERS,
    strategies: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Server aggregation time and peak memory of every rank strategy on random replies.

    For each strategy (default: every registered one but the layer strategies): ``num_clients``
    clients register through :class:`SimulatedNodes` with tiers of ``ranks`` in equal shares, the
    strategy's own ``initial_state`` (random factors of the ``block`` x ``layers`` shapes) is the
    global state, every client replies random arrays of the shapes it is sent, and the strategy's
    ``aggregate`` is called twice: once timed (wall seconds), once under tracemalloc (peak bytes
    of Python and numpy allocations; LAPACK's work arrays are not traced). helora-kd runs its
    FedAvg per rank group only (``epochs = 0``: no server model, no distillation); fedit trains
    every client at its one rank (the smallest tier's).
    """
    act_as_flower_task()
    modules = model_modules(block, layers)
    profiles = rank_profiles(ranks)
    rows = []
    for name in strategies if strategies is not None else rank_strategy_names():
        strategy = rank_strategy(name, modules, profiles)
        clients = strategy._register(SimulatedNodes(num_clients, {}, seed))
        global_state = strategy.initial_state()
        updates = random_updates(strategy, global_state, clients, seed)
        started = time.perf_counter()
        strategy.aggregate(1, updates, global_state)
        seconds = time.perf_counter() - started
        _, _, peak = traced(strategy.aggregate, 1, updates, global_state)
        client_ranks = [u.rank for u in updates]
        rows.append(
            {
                "strategy": name,
                "clients": len(updates),
                "ranks": [min(client_ranks), max(client_ranks)],
                "reply_bytes": sum(wire.nbytes(u.state) for u in updates),
                "seconds": seconds,
                "peak_bytes": peak,
                "note": STRATEGY_NOTES.get(name, ""),
            }
        )
        del strategy, updates, global_state
    return {"block": block, "layers": layers, "modules": len(modules), "strategies": rows}


def dense_svd(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The straightforward FlexLoRA server step, the reference for ``la.factored_svd``.

    ``W = sum_k w_k B_k A_k`` formed densely (``d_out x d_in``, float64, one client at a time),
    then a full SVD ``W = U diag(S) V^T`` (``np.linalg.svd``, reduced); returns
    ``(U[:, :rank], S[:rank], V^T[:rank, :])`` in the inputs' dtype, as
    :func:`~hetfed.lora_algebra.factored_svd` does.
    """
    total = np.zeros((bs[0].shape[0], as_[0].shape[1]))
    for weight, b, a in zip(weights, bs, as_, strict=True):
        total += (weight * b.astype(np.float64)) @ a.astype(np.float64)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    dtype = np.result_type(*bs, *as_)
    return u[:, :rank].astype(dtype), s[:rank].astype(dtype), vt[:rank].astype(dtype)


def per_shape(block: dict[str, tuple[int, int]]) -> list[str]:
    """The first module of each distinct shape of ``block``."""
    first: dict[tuple[int, int], str] = {}
    for module, shape in block.items():
        first.setdefault(shape, module)
    return list(first.values())


def flexlora_large(
    num_clients: int = 100,
    ranks: Sequence[int] = (4, 8, 16),
    block: dict[str, tuple[int, int]] = LLAMA_7B_BLOCK,
    dense_modules: str = "per-shape",
    seed: int = 0,
) -> dict[str, Any]:
    """FlexLoRA's aggregation of one transformer block: factored against dense, per module.

    ``num_clients`` clients with ranks cycling through ``ranks`` reply random float32 factors of
    each module of ``block``; the weights are FlexLoRA's, w_k = p_k s_k (random data sizes,
    s_k = 16 / r_k), and the target rank is max(``ranks``). Each module is aggregated with
    :func:`~hetfed.lora_algebra.factored_svd` and - on every module (``dense_modules="all"``) or
    on the first module of each shape (``"per-shape"``, since a full SVD of a 11008 x 4096 matrix
    takes minutes) - with :func:`dense_svd`. Time is wall seconds; memory is the tracemalloc peak
    (numpy arrays; LAPACK's work arrays inside ``np.linalg.svd`` are not traced, so the dense
    peak is a lower bound). ``speedup`` and ``memory_ratio`` are dense / factored summed (time)
    or maxed (peak) over the modules measured both ways; ``max_singular_value_difference`` is
    max |S_factored - S_dense| / S_dense[0] over them.
    """
    rng = np.random.default_rng(seed)
    client_ranks = [ranks[k % len(ranks)] for k in range(num_clients)]
    p = la.normalize_weights(rng.integers(10, 1000, size=num_clients))
    weights = [pk * LORA_ALPHA / r for pk, r in zip(p, client_ranks, strict=True)]
    target = max(ranks)
    measure_dense = set(block if dense_modules == "all" else per_shape(block))
    rows = []
    for module, (d_out, d_in) in block.items():
        bs = [rng.standard_normal((d_out, r), np.float32) for r in client_ranks]
        as_ = [rng.standard_normal((r, d_in), np.float32) for r in client_ranks]
        factored, f_seconds, f_peak = traced(la.factored_svd, bs, as_, weights, target)
        row = {
            "module": module,
            "shape": [d_out, d_in],
            "factored_seconds": f_seconds,
            "factored_peak_bytes": f_peak,
        }
        if module in measure_dense:
            dense, d_seconds, d_peak = traced(dense_svd, bs, as_, weights, target)
            row |= {
                "dense_seconds": d_seconds,
                "dense_peak_bytes": d_peak,
                "singular_value_difference": float(
                    np.max(np.abs(factored[1] - dense[1])) / dense[1][0]
                ),
            }
        rows.append(row)
        del bs, as_
    both = [r for r in rows if "dense_seconds" in r]
    return {
        "clients": num_clients,
        "ranks": list(ranks),
        "target_rank": target,
        "dense_modules": [r["module"] for r in both],
        "modules": rows,
        "factored_seconds_all_modules": sum(r["factored_seconds"] for r in rows),
        "speedup": sum(r["dense_seconds"] for r in both) / sum(r["factored_seconds"] for r in both),
        "memory_ratio": max(r["dense_peak_bytes"] for r in both)
        / max(r["factored_peak_bytes"] for r in both),
        "max_singular_value_difference": max(r["singular_value_difference"] for r in both),
    }


# --------------------------------------------------------------------------- item 4


def strategy_bytes_after_registration(scenario: str | Path, num_clients: int) -> tuple[int, float]:
    """Bytes a fresh strategy of the scenario holds once ``num_clients`` clients registered, and
    the seconds registration took.

    The strategy learns every budget through :meth:`LoRAStrategy._register` over
    :class:`SimulatedNodes`, under tracemalloc; the bytes it holds are those freed when it is
    deleted (everything only it references: budgets, node and client id maps, counters).
    """
    act_as_flower_task()
    run_config = cli.scenario_run_config(scenario, [])
    plan = plan_run(run_config, project_dir=scenario)
    nodes = SimulatedNodes(num_clients, run_config, plan.settings.seed)
    gc.collect()
    tracemalloc.start()
    try:
        strategy = plan.build_strategy()
        started = time.perf_counter()
        strategy._register(nodes)
        seconds = time.perf_counter() - started
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        del strategy
        gc.collect()
        held -= tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return held, seconds


def server_memory(scenario: str | Path, populations: Sequence[int] = (500, 5000)) -> dict[str, Any]:
    """Server memory per registered client: what the scenario's strategy holds after the budget
    queries of each population (:func:`strategy_bytes_after_registration`), and
    bytes per client = (held(N_max) - held(N_min)) / (N_max - N_min) (target < 1 KiB)."""
    rows = []
    for n in populations:
        held, seconds = strategy_bytes_after_registration(scenario, n)
        rows.append({"clients": n, "strategy_bytes": held, "registration_seconds": seconds})
    low, high = rows[0], rows[-1]
    return {
        "scenario": str(scenario),
        "populations": rows,
        "bytes_per_client": (high["strategy_bytes"] - low["strategy_bytes"])
        / (high["clients"] - low["clients"]),
    }


# --------------------------------------------------------------------------- the command


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


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(value: float) -> float:
    return value / 2**20


def report(results: dict[str, Any]) -> str:
    """The measured items as Markdown tables with their ratios."""
    parts = []
    if "client_throughput" in results:
        item = results["client_throughput"]
        rows = [
            (
                name,
                v["updates"],
                v["seconds"],
                v["updates_per_second"],
                v["first_update_seconds"],
                v["later_update_seconds"],
                _mib(v["peak_rss_bytes"]),
            )
            for name, v in item["variants"].items()
        ]
        parts.append(
            "## 1. Client updates per second\n\n"
            + _table(
                (
                    "variant",
                    "updates",
                    "s",
                    "updates/s",
                    "1st update s",
                    "later update s",
                    "peak RSS MiB",
                ),
                rows,
            )
            + f"\n\nspeedup hetfed/naive {item['speedup']:.2f}x (target >= 2); peak RSS "
            f"naive/hetfed {item['peak_rss_ratio_naive_over_hetfed']:.2f}x; max train-loss "
            f"difference {item['max_train_loss_difference']:.2g}"
        )
    if "framework_overhead" in results:
        item = results["framework_overhead"]
        rows = [
            (r["round"], r["clients"], r["train_seconds"], r["plain_steps_seconds"], r["ratio"])
            for r in item["rounds"]
        ]
        ratio = item["ratio"]
        later = "n/a" if ratio["rounds_2_on"] is None else f"{ratio['rounds_2_on']:.3f}"
        parts.append(
            "## 2. Framework overhead\n\n"
            + _table(("round", "clients", "train_seconds", "plain steps s", "ratio"), rows)
            + f"\n\nratio all rounds {ratio['all_rounds']:.3f}, rounds 2.. {later} "
            "(target <= 1.15)"
        )
    if "server_aggregation" in results:
        item = results["server_aggregation"]
        rows = [
            (
                r["strategy"],
                r["clients"],
                f"{r['ranks'][0]}..{r['ranks'][1]}",
                _mib(r["reply_bytes"]),
                r["seconds"],
                _mib(r["peak_bytes"]),
                r["note"],
            )
            for r in item["strategies"]
        ]
        parts.append(
            f"## 3a. Server aggregation ({item['layers']} blocks x {len(item['block'])} "
            f"modules)\n\n"
            + _table(("strategy", "clients", "ranks", "replies MiB", "s", "peak MiB", "note"), rows)
        )
    if "flexlora_large" in results:
        item = results["flexlora_large"]
        rows = [
            (
                r["module"],
                "x".join(map(str, r["shape"])),
                r["factored_seconds"],
                _mib(r["factored_peak_bytes"]),
                r.get("dense_seconds", "-"),
                _mib(r["dense_peak_bytes"]) if "dense_peak_bytes" in r else "-",
            )
            for r in item["modules"]
        ]
        parts.append(
            f"## 3b. FlexLoRA, one block, {item['clients']} clients, ranks {item['ranks']}\n\n"
            + _table(
                ("module", "shape", "factored s", "factored MiB", "dense s", "dense MiB"), rows
            )
            + f"\n\non {', '.join(item['dense_modules'])}: speedup {item['speedup']:.1f}x "
            f"(target >= 10), peak memory dense/factored {item['memory_ratio']:.1f}x; "
            f"max singular-value difference {item['max_singular_value_difference']:.2g}"
        )
    if "server_memory" in results:
        item = results["server_memory"]
        rows = [
            (r["clients"], r["strategy_bytes"], r["registration_seconds"])
            for r in item["populations"]
        ]
        parts.append(
            "## 4. Server memory per registered client\n\n"
            + _table(("clients", "strategy bytes", "registration s"), rows)
            + f"\n\n{item['bytes_per_client']:.0f} bytes per client (target < 1024)"
        )
    return "\n\n".join(parts)


def run_bench(
    items: Iterable[int] = ITEMS,
    quick: bool = False,
    out: str | Path = DEFAULT_OUT,
    scenario: str | Path = QUICKSTART,
    dense_modules: str = "per-shape",
    cpus: int = 1,
) -> dict[str, Any]:
    """Run the chosen items in order, print their tables, write the JSON after each item."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    base = scenario
    scenario = scenario_variant(base, out.parent / "scenario", sizes.workload)
    results: dict[str, Any] = {
        "command": " ".join(["hetfed", *sys.argv[1:]]),
        "quick": quick,
        "machine": machine(),
        "scenario": {"base": str(base), "run_config": sizes.workload},
    }
    steps: dict[int, list[tuple[str, Callable[[], dict[str, Any]]]]] = {
        1: [
            (
                "client_throughput",
                lambda: client_throughput(scenario, sizes.client_updates),
            )
        ],
        2: [
            (
                "framework_overhead",
                lambda: framework_overhead(
                    scenario, sizes.overhead_rounds, cpus, out.parent / "overhead"
                ),
            )
        ],
        3: [
            (
                "server_aggregation",
                lambda: server_aggregation(
                    sizes.aggregation_clients,
                    sizes.aggregation_ranks,
                    sizes.aggregation_block,
                    sizes.aggregation_layers,
                ),
            ),
            (
                "flexlora_large",
                lambda: flexlora_large(
                    sizes.large_clients, sizes.large_ranks, sizes.large_block, dense_modules
                ),
            ),
        ],
        4: [("server_memory", lambda: server_memory(scenario, sizes.populations))],
    }
    for item in sorted(set(items)):
        for key, measure in steps[item]:
            print(f"hetfed bench: measuring {key} ...", file=sys.stderr, flush=True)
            with quiet_flower():
                results[key] = measure()
            out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\nhetfed bench: results in {out}", file=sys.stderr)
    return results
