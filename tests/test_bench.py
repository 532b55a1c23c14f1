"""hetfed bench: the measurements run in quick mode and return well-formed results, the two
FlexLoRA implementations item 3 compares compute the same thing, and rounds record their
training time. No timing is asserted."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from hetfed import adapter_state, wire
from hetfed import lora_algebra as la
from hetfed.results import RoundRecord
from strategies.replies import ClientUpdate
from strategies.zeropad import ZeroPad
from tests.conftest import REPO
from tests.harness import InProcessGrid, global_state, make
from tests.test_cli import RANK_METHODS
from tooling import cli, scenarios
from tooling.bench import (
    aggregation,
    client_throughput,
    command,
    common,
    device_messages,
    overhead,
    packing,
    precision,
)
from tooling.loopback import Processes

QUICKSTART = REPO / "scenarios" / "quickstart"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def quick_scenario(tmp_path_factory):
    """The quickstart as ``hetfed bench --quick`` runs it: zeropad, the tiny random BERT."""
    return scenarios.write_variant(
        QUICKSTART, tmp_path_factory.mktemp("bench") / "scenario", common.QUICK_WORKLOAD
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_factored_and_dense_flexlora_aggregation_agree(dtype):
    """la.factored_svd (hetfed) and aggregation.dense_svd (dense sum, full SVD) give the same
    leading singular values and the same rank-r approximation of sum_k w_k B_k A_k."""
    rng = np.random.default_rng(0)
    ranks, d_out, d_in, target = [2, 4, 8, 3, 6], 30, 20, 8
    bs = [rng.standard_normal((d_out, r)).astype(dtype) for r in ranks]
    as_ = [rng.standard_normal((r, d_in)).astype(dtype) for r in ranks]
    weights = la.normalize_weights(rng.integers(1, 50, len(ranks))) * 16.0 / np.array(ranks)
    factored = la.factored_svd(bs, as_, weights, target)
    dense = aggregation.dense_svd(bs, as_, weights, target)
    tolerance = 1e-10 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(factored[1], dense[1], rtol=tolerance)
    approximation = [u @ np.diag(s) @ vt for u, s, vt in (factored, dense)]
    scale = np.abs(approximation[1]).max()
    np.testing.assert_allclose(approximation[0], approximation[1], atol=tolerance * scale * 10)
    assert all(part.dtype == dtype for result in (factored, dense) for part in result)


def test_flexlora_large_quick_measures_both_ways_on_one_module_per_shape():
    result = aggregation.flexlora_large(8, (4, 8, 16), aggregation.QUICK_7B_BLOCK, "per-shape")
    assert result["dense_modules"] == aggregation.per_shape(aggregation.QUICK_7B_BLOCK)
    assert len(result["dense_modules"]) == 3  # 4096x4096, 11008x4096, 4096x11008 scaled down
    assert [r["module"] for r in result["modules"]] == list(aggregation.QUICK_7B_BLOCK)
    assert result["max_singular_value_difference"] < 1e-4
    assert result["speedup"] > 0 and result["memory_ratio"] > 0
    json.dumps(result)


def test_server_aggregation_quick_runs_every_rank_strategy():
    result = aggregation.server_aggregation(8, (2, 4, 8), aggregation.QUICK_SMOLLM2_BLOCK, 2)
    rows = {r["strategy"]: r for r in result["strategies"]}
    assert set(rows) == set(aggregation.rank_strategy_names())
    assert set(RANK_METHODS) <= set(rows)
    assert not {"gd-hla", "rgd-hla", "fim-hla"} & set(rows)  # layer strategies are left out
    for row in rows.values():
        assert row["clients"] == 8 and row["seconds"] >= 0 and row["peak_bytes"] > 0
    assert rows["fedit"]["ranks"] == [2, 2] and rows["hetlora"]["ranks"] == [2, 8]
    assert "no server model" in rows["helora-kd"]["note"]
    assert result["modules"] == 2 * len(aggregation.QUICK_SMOLLM2_BLOCK)
    json.dumps(result)


def test_server_aggregation_rows_have_the_reference_beside_them():
    result = aggregation.server_aggregation(
        8, (2, 4, 8), aggregation.QUICK_SMOLLM2_BLOCK, 2, ["zeropad", "fedit", "flora", "flexlora"]
    )
    rows = {r["strategy"]: r for r in result["strategies"]}
    reference = result["reference"]
    assert (
        reference["ranks"] == [2, 8] and reference["reply_bytes"] == rows["zeropad"]["reply_bytes"]
    )
    for row in rows.values():
        assert row["percent_of_reference"] == pytest.approx(
            100 * row["reference_seconds"] / row["seconds"]
        )
        assert row["gb_per_second"] == pytest.approx(row["reply_bytes"] / row["seconds"] / 1e9)
    assert (
        rows["flexlora"]["flops_dtype"] == "float64" and rows["flora"]["flops_dtype"] == "float32"
    )
    assert rows["flora"]["flops"] == sum(
        2 * d_out * d_in * rows["flora"]["total_rank"]
        for d_out, d_in in aggregation.QUICK_SMOLLM2_BLOCK.values()
        for _ in range(2)
    )
    assert rows["flexlora"]["times_arithmetic"] > 0 and "flops" not in rows["zeropad"]
    report = command.aggregation_report(result)
    assert "| reference | 8 | 2..8 |" in report and ">= 50%" in report and "x arithmetic" in report
    json.dumps(result)


def test_reference_accumulation_is_the_uniform_padded_sum():
    rng = np.random.default_rng(0)
    updates = [
        ClientUpdate(k, 10, r, {"m.lora_B.weight": b, "m.lora_A.weight": a}, {}, 1.0)
        for k, (r, b, a) in enumerate(
            (r, rng.standard_normal((6, r), np.float32), rng.standard_normal((r, 5), np.float32))
            for r in (1, 3, 2)
        )
    ]
    b, a = aggregation.reference_accumulation(updates)["m"]
    expected = la.padded_sum(
        [u.lora["m"][0] for u in updates], [u.lora["m"][1] for u in updates], [1 / 3] * 3, 3
    )
    np.testing.assert_allclose(b, expected[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a, expected[1], rtol=1e-6, atol=1e-7)


def test_scenario_variant_switches_strategy_and_simulation(tmp_path):
    variant = scenarios.write_variant(
        QUICKSTART, tmp_path / "v", {"strategy": "zeropad"}, {"num-supernodes": 4}
    )
    config = scenarios.scenario_run_config(variant, [])
    assert config["strategy"] == "zeropad" and "hetlora.min-rank" not in config
    assert config["model.name"] == scenarios.scenario_run_config(QUICKSTART, [])["model.name"]
    assert scenarios.simulation_settings(variant)["num-supernodes"] == 4
    assert (variant / "profiles.yaml").read_text() == (QUICKSTART / "profiles.yaml").read_text()
    scenarios.check(variant, [])


def test_hetfed_and_naive_clients_do_the_same_work(quick_scenario):
    """Both train functions, called in this process, give the same losses for the same calls."""
    workload = common.client_workload(quick_scenario, ["fraction-train=1.0"])
    assert len(workload.calls) == 10  # every quickstart client, round 1
    calls = [(msg, context) for _, msg, context in workload.calls[-2:]]  # ranks 8
    results = {
        v: client_throughput.measure_client_calls(v, calls)
        for v in client_throughput.CLIENT_VARIANTS
    }
    for result in results.values():
        assert result["updates"] == 2 and result["updates_per_second"] > 0
        assert result["peak_rss_bytes"] > 0
    assert results["hetfed"]["train_losses"] == pytest.approx(results["naive"]["train_losses"])


def test_naive_client_refuses_more_than_plain_lora(tmp_path):
    hetlora = scenarios.write_variant(
        QUICKSTART, tmp_path / "h", {"model.name": "tiny-random-bert"}
    )
    _, msg, context = common.client_workload(hetlora).calls[0]
    assert wire.PRUNE_GAMMA in msg.content[wire.CONFIG]
    with pytest.raises(ValueError, match="plain LoRA only"):
        client_throughput.naive_train(msg, context)


def test_plain_steps_and_overhead_ratios(quick_scenario):
    plain = overhead.plain_training_seconds(quick_scenario, 1, 1)
    assert list(plain) == [1] and len(plain[1]) == 5  # fraction-train 0.5 of 10 clients
    ratios = overhead.overhead_ratios({1: 3 * sum(plain[1])}, plain)
    assert ratios == {"all_rounds": pytest.approx(3.0), "rounds_2_on": None}
    fake = {1: [1.0, 1.0], 2: [2.0], 3: [2.0]}
    ratios = overhead.overhead_ratios({1: 6.0, 2: 2.2, 3: 2.2}, fake)
    assert ratios == {"all_rounds": pytest.approx(10.4 / 6), "rounds_2_on": pytest.approx(1.1)}


def test_training_precision_quick_measures_every_variant_on_the_same_work(quick_scenario):
    """Item 5 on the tiny models: every variant timed each repeat, and bf16 did the fp32
    variant's work (the same examples, adapter and seed: losses equal but for rounding)."""
    result = precision.training_precision(
        quick_scenario, precision.QUICK_PRECISION_WORKLOADS, steps=2, repeats=2
    )
    assert [m["model"] for m in result["models"]] == ["tiny-random-bert", "tiny-random-llama"]
    for model in result["models"]:
        assert model["device"] == "cpu" and model["threads"] == 1
        variants = model["variants"]
        assert list(variants) == ["fp32", "bf16", "bf16 base"]
        assert all(len(v["seconds"]) == 2 and min(v["seconds"]) > 0 for v in variants.values())
        fp32 = variants["fp32"]["train_loss"]
        for name in ("bf16", "bf16 base"):
            assert variants[name]["train_loss"] == pytest.approx(fp32, rel=0.05)
        assert model["bf16_over_fp32"] > 0 and model["bf16_base_over_fp32"] > 0
    json.dumps(result)


def test_isolated_runs_in_a_process_of_its_own():
    assert common.isolated(os.getpid) != os.getpid()


def test_bench_command_quick_item_4_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--items", "4", "--out", str(out), "--scenario", str(QUICKSTART)]
    assert cli.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["machine"]["cpus"] == os.cpu_count()
    assert results["scenario"]["run_config"] == common.QUICK_WORKLOAD
    memory = results["server_memory"]  # what the strategy holds after registering 20, 200
    assert [r["clients"] for r in memory["populations"]] == [20, 200]
    small, large = (r["strategy_bytes"] for r in memory["populations"])
    assert 0 < small < large and memory["bytes_per_client"] == (large - small) / 180
    assert "client_throughput" not in results and "server_aggregation" not in results
    assert "## 4. Server memory per registered client" in capsys.readouterr().out


def test_device_messages_names_each_timed_process_by_the_message_its_node_received(tmp_path):
    """Item 6 reads a node's log for the kinds of its messages, in order, and pairs them with
    its timed ClientApp processes (by the node's port, in start order) and its reply times."""
    procs = Processes(tmp_path, {})
    received = ["query", "train", "train", "train"]
    (tmp_path / "node-0.log").write_text(
        "".join(f"INFO : Receiving: {kind} message\n" for kind in received)
    )
    starts = [10.0, 20.0, 40.0, 60.0]
    timed = [
        {"port": 5, "started": t, "wall_seconds": w, "cpu_seconds": c, "peak_rss_kib": 1}
        for t, w, c in zip(starts, [1.0, 9.0, 5.0, 3.0], [0.5, 8.0, 4.0, 2.0], strict=True)
    ]
    log = tmp_path / "clientapps.jsonl"
    log.write_text("".join(json.dumps(t) + "\n" for t in reversed(timed)))
    replied = {"node-0": [t + 0.5 for t in [10.5, 28.0, 44.0, 62.0]]}

    messages = device_messages._messages(log, procs, {5: "node-0"}, replied)
    assert [m["message"] for m in messages] == ["query", "train 1", "train 2", "train 3"]
    assert [m["reply_seconds"] for m in messages] == [1.0, 8.5, 4.5, 2.5]
    kinds = device_messages._by_kind(messages)
    assert kinds["query"] == {
        "messages": 1,
        "reply_seconds": 1.0,
        "wall_seconds": 1.0,
        "cpu_seconds": 0.5,
    }
    assert kinds["first train"]["wall_seconds"] == 9.0
    assert kinds["later trains"] == {
        "messages": 2,
        "reply_seconds": 3.5,
        "wall_seconds": 4.0,
        "cpu_seconds": 3.0,
    }
    replied["node-0"].pop()  # a reply the watcher did not see: the pairing is refused
    with pytest.raises(RuntimeError, match="received"):
        device_messages._messages(log, procs, {5: "node-0"}, replied)


def test_bench_command_quick_item_7_compares_packs_with_one_client_per_actor(tmp_path, capsys):
    """Item 7 on the tiny BERT: the reference and packs of 2 and 4 train the same 4 jobs of
    mixed ranks (the same losses), and the table has a row for each with the ratios."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--items", "7", "--out", str(out), "--scenario", str(QUICKSTART)]
    assert cli.main(argv) == 0
    item = json.loads(out.read_text())["packing"]
    assert item["run_config"]["train.base-dropout"] is False
    assert item["settings"]["ranks"] == [2, 4, 8]  # interleaved: every pack mixes ranks
    variants = {v["variant"]: v for v in item["variants"]}
    assert list(variants) == [packing.REFERENCE, "packed k=2", "packed k=4"]
    reference = variants[packing.REFERENCE]
    assert reference["pack_sizes"] == [1, 1, 1, 1]
    assert variants["packed k=2"]["pack_sizes"] == [2, 2]
    assert variants["packed k=4"]["pack_sizes"] == [4]
    for v in variants.values():
        assert v["updates"] == 4 and v["updates_per_second"] > 0
        assert v["memory_bytes"] > 0 and v["memory"] == "peak RSS" and v["base_copies"] == 1
    for k in (2, 4):
        v = variants[f"packed k={k}"]
        assert v["base_copies_same_concurrency"] == k
        assert v["updates_per_second_ratio"] == pytest.approx(
            v["updates_per_second"] / reference["updates_per_second"]
        )
        assert v["memory_ratio_same_concurrency"] == pytest.approx(
            v["memory_bytes"] / (k * reference["memory_bytes"])
        )
        assert v["max_train_loss_difference"] < 1e-5
    printed = capsys.readouterr().out
    assert "## 7. Packed training against one client per actor" in printed
    assert "| updates/s / reference | memory / reference | memory / as many actors |" in printed
    assert f"| {packing.REFERENCE} | 1 | 4 |" in printed
    ratio = variants["packed k=4"]["updates_per_second_ratio"]
    assert "| packed k=2 | 2 | 4 |" in printed and f"| {ratio:.2f} |" in printed


def test_interleave_ranks_mixes_every_pack():
    jobs = [
        SimpleNamespace(instruction=SimpleNamespace(rank=r), n=i)
        for i, r in enumerate([2, 2, 2, 4, 4, 8])
    ]
    mixed = packing.interleave_ranks(jobs)
    assert [j.n for j in mixed] == [0, 3, 5, 1, 4, 2]


def test_round_records_train_seconds_over_configure_to_aggregate():
    def slow_reply(client, msg):
        time.sleep(0.05)
        metrics = MetricRecord(
            {
                wire.NUM_EXAMPLES: 10,
                wire.RANK: int(msg.content[wire.CONFIG][wire.RANK]),
                wire.TRAIN_LOSS: 1.0,
            }
        )
        arrays = adapter_state.trainable(wire.from_record(msg.content[wire.ARRAYS]))
        return RecordDict({wire.ARRAYS: wire.to_record(arrays), wire.METRICS: metrics})

    strategy = make(ZeroPad, None)
    state = wire.to_record(global_state(np.random.default_rng(0)))
    grid = InProcessGrid(profiles=strategy.profiles, train=slow_reply)
    strategy.train_round(1, state, ConfigRecord(), grid, timeout=10)
    assert strategy.stats[1].train_seconds >= 3 * 0.05
    old = asdict(RoundRecord(0, 0.5, 1.0, 0, 0, 0, 0, 0, False, 0, 0, None, 1.0))
    del old["train_seconds"]  # a checkpoint written before train_seconds existed still loads
    assert RoundRecord(**old).train_seconds is None
