"""The packed trainer of a simulation (``simulation.packing``): one frozen base per device, and
many simulated clients' local training in one batched pass (:mod:`hetfed.packed_training`).

Every simulated client is still a Flower node: its ClientApp receives its own train message
and returns its own reply, built exactly as when it trains alone. In between it hands its
:class:`~client_apps.local_training.TrainJob` to the device's trainer, a named Ray actor (one
per GPU of a Ray node, or one per node without GPUs) that holds the base model once. The
trainer gathers the jobs that arrive together (within :data:`GATHER_SECONDS` of the first), up
to k of them (``auto``: as many as its free memory holds by the cost model), and trains them as
one pack; jobs that must not share a forward pass (another run's settings, another merged base
from FLoRA) wait for a pack of their own.

Failures stay with their client: a job that cannot be loaded (bad data, a wrong shape) fails
alone before the pack trains, and a pack whose training raises is retried one client at a
time, so only the client that breaks training fails. A trainer that dies is restarted by Ray;
each ClientApp waiting on it retries once on the new one, and never waits longer than the
round timeout: a failure becomes the client's error reply, never a hung round.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import ExitStack
from logging import ERROR, INFO

from flwr.app import Context, Message
from flwr.common.logger import log

from client_apps.local_training import (
    JobResult,
    LocalWork,
    TrainJob,
    reply_message,
    run_alone,
    worker_for,
)
from hetfed.budgets import local_update
from hetfed.config import PACKING_AUTO
from hetfed.cost_model import clients_per_pack
from hetfed.errors import ConfigError
from hetfed.models import CAUSAL_TASKS, cost_shape
from hetfed.packed_training import PackedClient, train_packed
from hetfed.profiles import available_memory_gb

GATHER_SECONDS = 0.2  # how long a pack waits, after its first job, for more to arrive
TRAINER_NAME = "hetfed-packed-trainer"
_RETRIES = 1  # attempts on a restarted trainer after the one that found it dead


def _pack_key(job: TrainJob) -> tuple:
    """Jobs with equal keys may share a forward pass: one run's settings, one merged base."""
    digest = hashlib.sha256()
    for name, delta in sorted(job.base_deltas.items()):
        digest.update(name.encode())
        digest.update(delta.tobytes())
    return job.settings, digest.hexdigest()


class PackedTrainer:
    """Trains the jobs handed to it (from any thread) in packs over this process's base.

    ``sizes`` records the size of every pack trained, in order.
    """

    def __init__(self, gather_seconds: float = GATHER_SECONDS) -> None:
        self.gather_seconds = gather_seconds
        self.sizes: list[int] = []
        self._arrivals: queue.Queue[tuple[TrainJob, Future]] = queue.Queue()
        self._waiting: list[tuple[TrainJob, Future]] = []
        threading.Thread(target=self._serve, name="packed-trainer", daemon=True).start()

    def train(self, job: TrainJob) -> JobResult:
        """Train ``job`` in the next pack it fits; its own error is raised here."""
        future: Future = Future()
        self._arrivals.put((job, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            self._gather()
            pack = self._next_pack()
            try:
                self._train(pack)
            except Exception as err:  # the trainer's own fault: the pack's clients fail with it
                log(ERROR, "[hetfed] the packed trainer failed on a pack of %d: %r", len(pack), err)
                for _, future in pack:
                    if not future.done():
                        future.set_exception(err)

    def _gather(self) -> None:
        """Wait for a job, then take every job that arrives within the gathering time (or
        until a pack of the configured k is waiting)."""
        if not self._waiting:
            self._waiting.append(self._arrivals.get())
        packing = self._waiting[0][0].settings.simulation.packing
        enough = math.inf if packing == PACKING_AUTO else int(packing)
        deadline = time.monotonic() + self.gather_seconds
        while len(self._waiting) < enough and (left := deadline - time.monotonic()) > 0:
            try:
                self._waiting.append(self._arrivals.get(timeout=left))
            except queue.Empty:
                break

    def _next_pack(self) -> list[tuple[TrainJob, Future]]:
        """The first waiting job and the waiting jobs that may share its pass, up to k."""
        key = _pack_key(self._waiting[0][0])
        fitting = [entry for entry in self._waiting if _pack_key(entry[0]) == key]
        pack = fitting[: _capacity(self._waiting[0][0], len(fitting))]
        taken = {id(entry) for entry in pack}
        self._waiting = [entry for entry in self._waiting if id(entry) not in taken]
        return pack

    def _train(self, pack: list[tuple[TrainJob, Future]]) -> None:
        loaded = []
        for slot, (job, future) in enumerate(pack):
            try:
                loaded.append((LocalWork(job, slot), future))
            except Exception as err:  # its own data or arrays: this client fails alone
                future.set_exception(err)
        if not loaded:
            return
        try:
            results = _train_pack([work for work, _ in loaded])
        except Exception as err:
            if len(loaded) == 1:
                loaded[0][1].set_exception(err)
                return
            log.warning(
                "a pack of %d failed (%s); training its clients one by one", len(loaded), err
            )
            for work, future in loaded:
                self._train([(work.job, future)])
            return
        self.sizes.append(len(loaded))
        ranks = [work.job.instruction.rank for work, _ in loaded]
        log(INFO, "[hetfed] packed trainer: a pack of %d clients (ranks %s)", len(loaded), ranks)
        for (_, future), result in zip(loaded, results, strict=True):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def _train_pack(works: list[LocalWork]) -> list[JobResult | Exception]:
    """Load every client's adapter, train those that loaded together, read each back: each
    client's result, or the error that stopped it alone."""
    host = works[0].worker.host
    outcomes: dict[int, JobResult | Exception] = {}
    ready: dict[int, LocalWork] = {}
    with host.lock:
        for i, work in enumerate(works):
            try:
                work.load()
                ready[i] = work
            except Exception as err:  # a wrong shape or scaling: this client fails alone
                outcomes[i] = err
        if ready:
            host.set_base_deltas(works[min(ready)].job.base_deltas)
            model = host.train_together([work.spec for work in ready.values()])
            with ExitStack() as frozen:
                for work in ready.values():
                    frozen.enter_context(work.frozen_parts())
                clients = [
                    PackedClient(work.spec, work.data, work.job.seed, work.job.steps, work.penalty)
                    for work in ready.values()
                ]
                trained = train_packed(model, clients, works[0].job.settings.train)
            for (i, work), result in zip(ready.items(), trained, strict=True):
                outcomes[i] = work.result(result)
    return [outcomes[i] for i in range(len(works))]


def _capacity(job: TrainJob, waiting: int) -> int:
    """k: the configured pack size, or (``auto``) as many clients as free memory holds."""
    packing = job.settings.simulation.packing
    if packing != PACKING_AUTO:
        return int(packing)
    settings = job.settings
    model = settings.model
    shape = cost_shape(model, len(worker_for(settings).label_names))
    scored = model.max_new_tokens + 1 if model.task in CAUSAL_TASKS else 1
    blocks = tuple(range(shape.blocks))
    update = local_update(settings, job.instruction.rank, blocks, scored, job.steps)
    return clients_per_pack(shape, update, _free_bytes(), most=waiting)


def _free_bytes() -> float:
    """Free memory where the base computes: the GPU's, else the machine's."""
    import torch

    from hetfed.models import compute_device

    device = compute_device()
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return available_memory_gb() * 2**30


class _TrainerActor:
    """The Ray actor around a :class:`PackedTrainer` (one per device; calls run in threads)."""

    def __init__(self) -> None:
        import torch

        # Ray gives an actor without CPUs one OpenMP thread; the waiting ClientApps hold the
        # CPUs but do not compute, so the trainer takes every core this process may use
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.trainer = PackedTrainer()

    def train(self, job: TrainJob) -> JobResult:
        return self.trainer.train(job)


_trainers: dict[str, object] = {}  # this process's handles, by trainer name
_trainers_lock = threading.Lock()


def trainer_actor(client_id: int):
    """This Ray node's trainer for ``client_id`` (its GPU: client id modulo the node's GPUs),
    created by the first client that asks for it.

    The process keeps the handle: Ray destroys an actor (and the base it loaded) as soon as no
    handle to it is left, which would otherwise happen between rounds, and in a race with a
    client that is just asking for it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    gpus = next((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == node), 0)
    name = f"{TRAINER_NAME}-{node}-{client_id % gpus if gpus else 0}"
    with _trainers_lock:
        if name not in _trainers:
            _trainers[name] = (
                ray.remote(_TrainerActor)
                .options(
                    name=name,
                    get_if_exists=True,
                    num_cpus=0,  # the ClientApps' actors hold the CPUs; they only wait on this one
                    num_gpus=1 if gpus else 0,
                    max_concurrency=1024,  # every waiting client a thread
                    max_restarts=-1,
                    max_task_retries=_RETRIES,  # a call in flight when it died, on the new one
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                )
                .remote()
            )
        return _trainers[name]


def forget_trainer(handle) -> None:
    """Drop a handle whose trainer is gone for good, so that the next call starts another."""
    with _trainers_lock:
        for name, kept in list(_trainers.items()):
            if kept is handle:
                del _trainers[name]


def train_in_pack(msg: Message, context: Context) -> Message:
    """Hand this client's job to the device's packed trainer and reply with what it trained.

    Outside Ray (a deployed SuperNode: one device, one client) the client trains alone.
    """
    started = time.perf_counter()
    job = TrainJob.from_message(msg, context)
    import ray

    if not ray.is_initialized():
        log(
            INFO, "[hetfed] simulation.packing applies to simulated clients; this node trains alone"
        )
        return reply_message(msg, job, run_alone(job), started)
    if ray.get_gpu_ids():  # this ClientApp's actor holds a GPU the trainer would wait for
        raise ConfigError(
            "client-resources-num-gpus",
            len(ray.get_gpu_ids()),
            "0 with simulation.packing: the packed trainer holds the GPU, the ClientApps wait",
            "federation config",
        )
    trainer = trainer_actor(job.client_id)
    try:  # a trainer that dies while it works is restarted, and Ray resends its calls once
        result = ray.get(trainer.train.remote(job), timeout=job.settings.round_timeout)
    except ray.exceptions.RayActorError as err:
        forget_trainer(trainer)  # gone for good (its owner died): the next round starts another
        raise RuntimeError(f"the packed trainer died twice: {err}") from err
    return reply_message(msg, job, result, started)
