"""The packed trainer (simulation.packing): on real Flower train messages, a packed client's
reply equals the reply it gives when it trains alone, and a failing client fails alone."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from client_apps.local_training import TrainJob, reply_message, run_alone
from client_apps.node_config import NUM_PARTITIONS, PARTITION_ID
from client_apps.packed_trainer import PackedTrainer
from hetfed import wire
from hetfed.adapters import AdapterHost
from hetfed.checkpoint import load_checkpoint
from hetfed.cost_model import UpdateShape, clients_per_pack, step_cost
from hetfed.data import load_splits
from hetfed.models import ModelConfig, build_model, cost_shape
from hetfed.server_model import ServerModel
from hetfed.training import encode_split
from server_apps.run_plan import plan_run
from strategies.registry import load_strategy, strategy_names
from tests.conftest import learned_rounds, write_scenario
from tests.harness import InProcessGrid
from tests.test_end_to_end import EXTRA_CONFIG
from tests.test_generation import generation_config, write_pairs

# Six clients at ranks 2/4/8/16, with layer budgets (the tiny model has 2 blocks).
MIXED_PROFILES = """\
tiers:
  r2: {rank: 2, layers: 1}
  r4: {rank: 4, layers: 1}
  r8: {rank: 8, layers: 2}
  r16: {rank: 16, layers: 2}
assignment:
  by-partition: [r2, r4, r8, r16, r2, r8]
"""
TIERS = ["r2", "r4", "r8", "r16", "r2", "r8"]
PACKED = {"simulation.packing": 6, "train.base-dropout": False}
TOLERANCE = 1e-5


def _plan(tmp_path, config):
    scenario = write_scenario(tmp_path / "scenario", config, MIXED_PROFILES, num_supernodes=6)
    return plan_run(config, scenario)


def _bound_strategy(plan):
    """The plan's strategy bound to a server model of its own (a fresh base)."""
    settings = plan.settings
    splits = load_splits(settings.data)
    model, tokenizer = build_model(settings.model, len(splits.label_names), settings.seed)
    test = encode_split(settings.model, splits.test, splits.label_names, tokenizer)
    public = None
    if splits.server is not None:
        public = encode_split(settings.model, splits.server, splits.label_names, tokenizer)
    strategy = plan.build_strategy()
    strategy.bind(ServerModel(settings, AdapterHost(model), test, public, tokenizer))
    return strategy


def _context(config, client):
    node_config = {PARTITION_ID: client, NUM_PARTITIONS: len(TIERS)}
    return Context(
        run_id=1,
        node_id=100 + client,
        node_config=node_config,
        state=RecordDict(),
        run_config=config,
    )


def _round(strategy, grid, server_round, global_record, config, train, edit=None):
    """Configure a round on the real strategy, answer each train message with ``train(job)``
    (in threads, all at once, as simulated clients do), aggregate; the replies and the global.
    ``edit(client, instruction)`` may change a client's train instruction first."""
    messages = list(strategy.configure_train(server_round, global_record, ConfigRecord(), grid))
    jobs = {}
    for msg in messages:
        client = grid.client_ids[msg.metadata.dst_node_id]
        if edit is not None:
            edit(client, msg.content[wire.CONFIG])
        jobs[client] = (msg, TrainJob.from_message(msg, _context(config, client)))
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {c: pool.submit(train, job) for c, (_, job) in jobs.items()}
        results = {c: f.result() for c, f in futures.items()}
    replies = [reply_message(msg, job, results[client], 0.0) for client, (msg, job) in jobs.items()]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return results, arrays


def _assert_equal_rounds(packed_rounds, alone_rounds):
    for packed, alone in zip(packed_rounds, alone_rounds, strict=True):
        _assert_equal_round(packed, alone)


def _assert_equal_round(packed, alone):
    (packed_results, packed_global), (alone_results, alone_global) = packed, alone
    assert sorted(packed_results) == sorted(alone_results)
    for client, result in alone_results.items():
        other = packed_results[client]
        assert other.rank == result.rank and other.num_examples == result.num_examples
        assert other.train_loss == pytest.approx(result.train_loss, abs=TOLERANCE)
        assert sorted(other.state) == sorted(result.state)
        for key, value in result.state.items():
            np.testing.assert_allclose(other.state[key], value, atol=TOLERANCE, rtol=0)
    assert sorted(packed_global) == sorted(alone_global)
    for key, value in alone_global.items():
        np.testing.assert_allclose(packed_global[key], value, atol=TOLERANCE, rtol=0)


def _packed_vs_alone(tmp_path, config, strategy, rounds=1, edit=None, **options):
    """``rounds`` rounds of six clients, packed (all six in one pack) and alone, from the same
    global state on two strategies built alike; each round's results and global state."""
    config = {**config, **PACKED, "strategy": strategy, **options}
    plan = _plan(tmp_path, config)
    trainer = PackedTrainer(gather_seconds=1.0)
    outcomes = []
    for train in (trainer.train, run_alone):
        strategy = _bound_strategy(plan)
        grid = InProcessGrid(TIERS, strategy.profiles, first_node=100, client_ids=range(6))
        record = wire.to_record(strategy.initial_state())
        by_round = []
        for server_round in range(1, rounds + 1):
            results, record = _round(strategy, grid, server_round, record, config, train, edit)
            by_round.append((results, wire.from_record(record)))
        outcomes.append(by_round)
    assert trainer.sizes == [len(TIERS)] * rounds  # each round one pack of six
    return outcomes


def test_packed_replies_equal_alone_replies_with_mixed_ranks_and_layer_budgets(
    tmp_path, tiny_config
):
    """rgd-hla with HetLoRA's ranks (ranks 2/4/8/16, random layers, self-pruning), a client on
    fewer local steps (a straggler's partial work) and one with A frozen (FFA-LoRA's), LoRA
    dropout on: two rounds, replies and globals equal to 1e-5."""

    sent_ranks = set()

    def edit(client, instruction):
        sent_ranks.add(instruction[wire.RANK])
        if client == 1:
            instruction[wire.LOCAL_STEPS] = 3
        if client == 2:
            instruction[wire.FROZEN] = ["lora_A"]

    config = {**tiny_config, "lora.dropout": 0.1}
    rounds = _packed_vs_alone(
        tmp_path, config, "rgd-hla", rounds=2, edit=edit, **{"rgd-hla.ranks": "hetlora"}
    )
    packed, alone = rounds
    assert sent_ranks == {2, 4, 8, 16}
    _assert_equal_rounds(packed, alone)


BUILT_IN = [n for n in strategy_names() if load_strategy(n).__module__.startswith("strategies.")]


@pytest.mark.parametrize("strategy", [name for name in BUILT_IN if name != "rgd-hla"])
def test_every_method_client_side_trains_the_same_packed(tmp_path, tiny_config, strategy):
    """Each method's client side (FLoRA's merged base and fresh A, HeLoRA-KD, the layer
    methods, ...), packed and alone: replies and globals equal to 1e-5 (FLoRA two rounds:
    the second trains on the base merged after the first)."""
    rounds = 2 if strategy == "flora" else 1
    packed, alone = _packed_vs_alone(
        tmp_path, tiny_config, strategy, rounds=rounds, **EXTRA_CONFIG.get(strategy, {})
    )
    _assert_equal_rounds(packed, alone)


@pytest.mark.slow
def test_a_packed_simulation_ends_where_the_unpacked_one_does(run_scenario, tiny_config):
    """Through flwr run and the Simulation Engine: four ClientApp actors hand their jobs to the
    packed trainer actor; the run learns and ends with the unpacked run's global adapter."""
    config = {**tiny_config, "train.base-dropout": False, "num-server-rounds": 2}
    four_actors = {"init-args-num-cpus": 4, "client-resources-num-cpus": 1}
    finals = []
    for packing, results_dir in (("off", "alone"), (4, "packed")):
        run = {**config, "simulation.packing": packing, "results-dir": results_dir}
        proc, results = run_scenario(run, simulation=four_actors)
        learned_rounds(proc, results, gain=0.0)
        finals.append(load_checkpoint(results).state)
    assert "packed trainer: a pack of 4 clients" in proc.stdout + proc.stderr
    alone, packed = finals
    assert sorted(packed) == sorted(alone)
    for key, value in alone.items():
        np.testing.assert_allclose(packed[key], value, atol=TOLERANCE, rtol=0)


def test_a_generation_round_trains_the_same_packed(tmp_path, tiny_config):
    """The generation task (a causal LM, left-padded prompts, targets scored on the last
    positions), ranks 2/4/8/16 with layer budgets, packs sized by ``auto``: replies and the
    global equal to 1e-5."""
    config = generation_config(write_pairs(tmp_path / "pairs"), tiny_config)
    options = {"rgd-hla.ranks": "hetlora", "simulation.packing": "auto"}  # memory holds six
    packed, alone = _packed_vs_alone(tmp_path, config, "rgd-hla", **options)
    _assert_equal_rounds(packed, alone)


def _round_jobs(tmp_path, config):
    """The six train jobs of round 1 of a hetlora run (mixed ranks), from real messages."""
    config = {**config, **PACKED}
    strategy = _bound_strategy(_plan(tmp_path, config))
    grid = InProcessGrid(TIERS, strategy.profiles, first_node=100, client_ids=range(6))
    record = wire.to_record(strategy.initial_state())
    messages = strategy.configure_train(1, record, ConfigRecord(), grid)
    return [(msg, _context(config, grid.client_ids[msg.metadata.dst_node_id])) for msg in messages]


def test_a_failing_client_fails_alone_in_its_pack(tmp_path, tiny_config):
    """One client of six was sent an array of the wrong shape: it fails with that error, and
    the other five, trained in the same pack, reply as they would alone."""
    jobs = [
        TrainJob.from_message(msg, context) for msg, context in _round_jobs(tmp_path, tiny_config)
    ]
    bad = dict(jobs[3].received)
    key = sorted(k for k in bad if "lora_A" in k)[0]
    bad[key] = np.zeros((bad[key].shape[0] + 1, bad[key].shape[1]), np.float32)
    jobs[3] = replace(jobs[3], received=bad)
    trainer = PackedTrainer(gather_seconds=1.0)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(trainer.train, job) for job in jobs]
    with pytest.raises(ValueError, match="has shape"):
        futures[3].result()
    for i, job in enumerate(jobs):
        if i != 3:
            alone, packed = run_alone(job), futures[i].result()
            for name, value in alone.state.items():
                np.testing.assert_allclose(packed.state[name], value, atol=TOLERANCE, rtol=0)
    assert trainer.sizes == [len(jobs)]  # one pack: the bad client failed while loading


def test_a_killed_trainer_does_not_hang_the_round(tmp_path, tiny_config):
    """Through Ray, as in simulation: six ClientApp calls wait on the trainer actor, which is
    killed while it works; Ray restarts it (another process), resends every call once, and
    each replies with its trained adapter; none waits past the round timeout."""
    import ray

    from client_apps.packed_trainer import TRAINER_NAME, train_in_pack

    calls = _round_jobs(tmp_path, {**tiny_config, "train.local-steps": 300})  # some seconds
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(train_in_pack, msg, context) for msg, context in calls]
            deadline = time.monotonic() + 120
            while not [a for a in ray.util.list_named_actors() if a.startswith(TRAINER_NAME)]:
                assert time.monotonic() < deadline, "no trainer actor was started"
                time.sleep(0.2)
            (name,) = [a for a in ray.util.list_named_actors() if a.startswith(TRAINER_NAME)]
            trainer = ray.get_actor(name)
            killed = ray.get(trainer.__ray_call__.remote(lambda _: os.getpid()))  # calls sent
            time.sleep(1.0)  # it is loading the model and training
            ray.kill(trainer, no_restart=False)
            replies = [future.result(timeout=300) for future in futures]
            restarted = ray.get(trainer.__ray_call__.remote(lambda _: os.getpid()))
    finally:
        ray.shutdown()
    assert restarted != killed
    for (msg, _), reply in zip(calls, replies, strict=True):
        sent = wire.from_record(msg.content[wire.ARRAYS])
        trained = wire.from_record(reply.content[wire.ARRAYS])
        assert {k: v.shape for k, v in trained.items()} == {k: sent[k].shape for k in trained}
        assert all(np.isfinite(v).all() for v in trained.values())
        assert any(not np.array_equal(trained[k], sent[k]) for k in trained)


def test_the_trainer_outlives_a_round():
    """Two ClientApp actors ask for the trainer in round 1 and again in round 2, after every
    handle of round 1's calls is gone: the same trainer process answers (the base is loaded
    once per device, not once per round, and no client finds it being torn down)."""
    import ray

    from client_apps.packed_trainer import trainer_actor

    @ray.remote(num_cpus=0)
    class ClientAppActor:
        def trainer_pid(self, client_id: int) -> int:
            return ray.get(trainer_actor(client_id).__ray_call__.remote(lambda _: os.getpid()))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        clients = [ClientAppActor.remote() for _ in range(2)]
        rounds = []
        for _ in range(2):
            rounds.append(ray.get([c.trainer_pid.remote(i) for i, c in enumerate(clients)]))
            time.sleep(1.0)  # what Ray needs to tear down an actor nobody holds
    finally:
        ray.shutdown()
    assert len({pid for pids in rounds for pid in pids}) == 1, rounds


def test_auto_packs_as_many_clients_as_free_memory_holds():
    """clients_per_pack: free memory over one client's step state (activations, adapter and
    head, the cost model's), at least 1, at most the clients waiting."""
    shape = cost_shape(ModelConfig(name="tiny-random-bert", max_length=32), 5)
    update = UpdateShape(4, ("query", "value"), (0, 1), steps=8, batch=16, tokens=32)
    step = step_cost(shape, update)
    per_client = step.activations + step.adapter + step.head
    assert clients_per_pack(shape, update, 3.5 * per_client, most=64) == 3
    assert clients_per_pack(shape, update, 3.5 * per_client, most=2) == 2
    assert clients_per_pack(shape, update, 0.5 * per_client, most=64) == 1


def test_a_bf16_base_trains_the_same_packed_up_to_its_rounding(tmp_path, tiny_config):
    """A bfloat16 base (model.dtype, on the CPU): the base computes in bf16, whose rounding
    depends on the batch's shape, so a packed reply equals the alone one up to bf16 rounding
    (its relative precision 2**-8 = 0.0039; measured: at most 0.0075 on weights of about 0.3
    after 8 steps), not to 1e-5; the LoRA factors and the head stay float32."""
    config = {**tiny_config, "model.dtype": "bfloat16"}
    packed, alone = _packed_vs_alone(tmp_path, config, "rgd-hla", **{"rgd-hla.ranks": "hetlora"})
    (packed_results, _), (alone_results, _) = packed[0], alone[0]
    for client, result in alone_results.items():
        for key, value in result.state.items():
            assert packed_results[client].state[key].dtype == np.float32
            np.testing.assert_allclose(packed_results[client].state[key], value, atol=0.02, rtol=0)
