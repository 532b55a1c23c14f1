"""FedSA-LoRA: A shared and averaged per rank index, B kept on each client across rounds.

Expected values are written out here with plain numpy (a row-by-row weighted mean), not with
hetfed's own functions. The client side runs the real ClientApp code on the tiny model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from client_apps.local_training import TrainJob, evaluate_locally, reply_message, run_alone
from client_apps.node_config import NODE_STATE_DIR, NUM_PARTITIONS, PARTITION_ID
from client_apps.personal_state import PersonalStore
from hetfed import wire
from hetfed.adapter_state import LORA_B
from hetfed.adapters import AdapterHost
from hetfed.config import RunSettings
from hetfed.data import load_splits
from hetfed.data_config import DataConfig
from hetfed.errors import ConfigError
from hetfed.models import build_model
from hetfed.results import read_metrics
from hetfed.server_model import ServerModel
from hetfed.training import encode_split
from server_apps.run_plan import plan_run
from strategies.fedit import FedIT
from strategies.fedsa_lora import FedSALoRA
from tests.conftest import write_scenario
from tests.harness import MODULES, PROFILES, InProcessGrid, global_state, train_round, trained

EVALUATED = {"fraction-evaluate": 1.0, "data.local-test-fraction": 0.25}


def _strategy() -> FedSALoRA:
    settings = RunSettings(
        min_train_nodes=1,
        min_available_nodes=3,
        fraction_evaluate=1.0,
        data=DataConfig(local_test_fraction=0.25),
    )
    return FedSALoRA(settings, PROFILES)


def test_only_a_and_the_head_travel_and_b_is_personal():
    """Client k is sent A[:r_k, :] and the head, no B, and told to keep B itself."""
    strategy = _strategy()
    state = global_state(np.random.default_rng(0))
    reply, returned = trained(np.random.default_rng(1))
    messages, _ = train_round(strategy, state, reply)
    for msg in messages:
        config = msg.content[wire.CONFIG]
        rank = int(config[wire.RANK])
        sent = wire.from_record(msg.content[wire.ARRAYS])
        assert not [k for k in sent if "lora_B" in k]
        for module in MODULES:
            key = f"{module}.lora_A.weight"
            np.testing.assert_array_equal(sent[key], state[key][:rank])
        np.testing.assert_array_equal(sent["classifier.bias"], state["classifier.bias"])
        assert list(config[wire.PERSONAL]) == ["lora_B"]
        assert config[wire.PERSONAL_KEY] == strategy.personal_key
    assert all(not [k for k in r if "lora_B" in k] for r in returned.values())


def test_each_row_of_a_is_averaged_over_the_clients_that_hold_it():
    """Ranks 2/4/8, n_k = 5/20/75: row i of A is sum_{k: r_k > i} n_k A_k[i] / sum n_k over
    the same k; B keeps its global value; the head is the n_k-weighted mean."""
    strategy = _strategy()
    state = global_state(np.random.default_rng(0), rank=8)
    examples = {1000: 5, 1001: 20, 1002: 75}
    reply, returned = trained(np.random.default_rng(2), n_examples=examples)
    _, new = train_round(strategy, state, reply)
    ranks = {node: returned[node][f"{MODULES[0]}.lora_A.weight"].shape[0] for node in returned}
    assert sorted(ranks.values()) == [2, 4, 8]
    for module in MODULES:
        key = f"{module}.lora_A.weight"
        for i in range(8):
            holders = [node for node in returned if ranks[node] > i]
            total = sum(examples[node] for node in holders)
            row = sum(
                examples[node] * returned[node][key][i].astype(np.float64) for node in holders
            )
            np.testing.assert_allclose(new[key][i], row / total, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(
            new[f"{module}.lora_B.weight"], state[f"{module}.lora_B.weight"]
        )
    total = sum(examples.values())
    for key in ("classifier.weight", "classifier.bias"):
        head = sum(examples[node] * returned[node][key].astype(np.float64) for node in returned)
        np.testing.assert_allclose(new[key], head / total, rtol=1e-5, atol=1e-6)


class _PersonalFedIT(FedIT):
    """FedIT whose clients keep B: what any method gets from declaring ``personal``."""

    personal = (LORA_B,)


def test_any_method_that_declares_a_factor_personal_keeps_it_on_the_clients():
    """The base does the plumbing: B is not sent, the instruction names it with the run's key
    (checkpointed), a reply without B is accepted and the rule sees the global B in its place:
    FedIT's mean gives A = sum n_k A_k / sum n_k and leaves B as it was."""
    settings = RunSettings(min_train_nodes=1, min_available_nodes=3)
    strategy = _PersonalFedIT(settings, PROFILES)
    state = global_state(np.random.default_rng(0), rank=2)
    examples = {1000: 5, 1001: 20, 1002: 75}
    reply, returned = trained(np.random.default_rng(3), n_examples=examples)
    messages, new = train_round(strategy, state, reply)
    for msg in messages:
        assert not [k for k in wire.from_record(msg.content[wire.ARRAYS]) if "lora_B" in k]
        assert msg.content[wire.CONFIG][wire.PERSONAL_KEY] == strategy.personal_key
    assert len(returned) == 3 and new is not None
    for module in MODULES:
        a = f"{module}.lora_A.weight"
        mean = sum(examples[n] * returned[n][a].astype(np.float64) for n in returned) / 100
        np.testing.assert_allclose(new[a], mean, rtol=1e-5, atol=1e-6)
        b = f"{module}.lora_B.weight"
        np.testing.assert_allclose(new[b], state[b], rtol=1e-6)
    resumed = _PersonalFedIT(settings, PROFILES)
    resumed.load_state_dict(json.loads(json.dumps(strategy.state_dict())))
    assert resumed.personal_key == strategy.personal_key
    assert FedIT(settings, PROFILES).personal_key == ""  # a shared method has none


def test_it_needs_federated_evaluation():
    with pytest.raises(ConfigError, match="fraction-evaluate.*0.0.*> 0 for fedsa-lora"):
        FedSALoRA(RunSettings(min_available_nodes=3), PROFILES)


def test_a_resumed_strategy_keeps_the_runs_personal_key():
    first, resumed = _strategy(), _strategy()
    assert first.personal_key != resumed.personal_key  # each run its own
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.personal_key == first.personal_key


def test_the_store_keeps_the_two_newest_rounds(tmp_path):
    store = PersonalStore.of(str(tmp_path), {}, "run1", client_id=3)
    assert store.latest(5) == {}
    for server_round in (1, 2, 4):
        store.save(server_round, {"b": np.full((2, 2), server_round, np.float32)})
    assert store.rounds() == [2, 4]
    assert store.latest(3)["b"][0, 0] == 2  # a resume that repeats round 4 starts from round 2
    assert store.latest(4)["b"][0, 0] == 4
    assert store.folder == tmp_path / "client-state" / "run1" / "client-3"
    device = PersonalStore.of(str(tmp_path), {NODE_STATE_DIR: str(tmp_path / "dev")}, "run1", 3)
    assert device.folder == tmp_path / "dev" / "run1" / "client-3"
    with pytest.raises(ValueError, match="personal-key"):
        PersonalStore.of(str(tmp_path), {}, "../escape", 3)


def _context(config, client):
    node_config = {PARTITION_ID: client, NUM_PARTITIONS: 3}
    return Context(1, 100 + client, node_config, RecordDict(), config)


def test_a_client_trains_its_own_b_from_round_to_round(tmp_path, tiny_config):
    """Real ClientApp code on the tiny model: round 1 starts from B = 0 and keeps the trained B
    on the client; round 2 starts from that B (not from the server, which never sees it), and
    federated evaluation scores the global A with the client's own B."""
    config = {**tiny_config, **EVALUATED, "strategy": "fedsa-lora", "results-dir": str(tmp_path)}
    config["min-available-nodes"] = config["min-train-nodes"] = 3
    plan = plan_run(config, write_scenario(tmp_path / "scenario", config, num_supernodes=3))
    settings = plan.settings
    splits = load_splits(settings.data)
    model, tokenizer = build_model(settings.model, len(splits.label_names), settings.seed)
    test = encode_split(settings.model, splits.test, splits.label_names, tokenizer)
    strategy = plan.build_strategy()
    strategy.bind(ServerModel(settings, AdapterHost(model), test, None, tokenizer))
    tiers = [plan.profiles.tier_for_partition(i, 3).name for i in range(3)]
    grid = InProcessGrid(tiers, plan.profiles, first_node=100, client_ids=range(3))
    arrays = wire.to_record(strategy.initial_state())
    kept = {}
    for server_round in (1, 2):
        (msg, *_) = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        client = grid.client_ids[msg.metadata.dst_node_id]
        job = TrainJob.from_message(msg, _context(config, client))
        if server_round == 1:
            assert job.personal == {}  # peft's B = 0
        else:
            assert job.personal.keys() == kept.keys()
            for key, value in kept.items():
                np.testing.assert_array_equal(job.personal[key], value)
        result = run_alone(job)
        reply = reply_message(msg, job, result, 0.0)
        assert not [k for k in wire.from_record(reply.content[wire.ARRAYS]) if "lora_B" in k]
        kept = {k: v for k, v in result.state.items() if "lora_B" in k}
        assert all(np.abs(v).max() > 0 for v in kept.values())  # it trained B
        stored = job.personal_store().latest(server_round)
        assert all(np.array_equal(stored[k], v) for k, v in kept.items())
    evaluate = next(iter(strategy.configure_evaluate(2, arrays, ConfigRecord(), grid)))
    client = grid.client_ids[evaluate.metadata.dst_node_id]
    evaluated = TrainJob.from_message(evaluate, _context(config, client), evaluating=True)
    assert evaluated.personal.keys() == kept.keys()
    assert (
        wire.EvaluateReply.from_record(
            evaluate_locally(evaluate, _context(config, client)).content[wire.METRICS]
        ).num_examples
        > 0
    )


@pytest.mark.slow
def test_a_run_trains_personal_models(run_scenario, tiny_config):
    """Through flwr run: the clients' own models (shared A, their B) learn on their test
    splits, while the server's model (B = 0) is the base with the shared head."""
    proc, results = run_scenario({**tiny_config, **EVALUATED, "strategy": "fedsa-lora"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rounds = read_metrics(results)
    assert rounds[-1]["client_accuracy_mean"] > 0.5  # five topics: chance is 0.2
    assert not [k for k in (results / "client-state").rglob("round-*.npz") if k.stat().st_size == 0]
