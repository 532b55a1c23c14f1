"""``hetfed bench``: run the chosen items, print their tables, write the JSON after each item."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from tooling import scenarios
from tooling.bench import ITEMS
from tooling.bench.aggregation import (
    ARITHMETIC_TARGETS,
    LLAMA_7B_BLOCK,
    PERCENT_TARGETS,
    QUICK_7B_BLOCK,
    QUICK_SMOLLM2_BLOCK,
    SMOLLM2_135M_BLOCK,
    SMOLLM2_135M_LAYERS,
    flexlora_large,
    server_aggregation,
)
from tooling.bench.client_throughput import client_throughput
from tooling.bench.common import (
    DEFAULT_OUT,
    QUICK_WORKLOAD,
    QUICKSTART,
    WORKLOAD,
    machine,
    quiet_flower,
)
from tooling.bench.device_messages import device_messages
from tooling.bench.overhead import framework_overhead
from tooling.bench.packing import packing_throughput
from tooling.bench.precision import (
    PRECISION_WORKLOADS,
    QUICK_PRECISION_WORKLOADS,
    training_precision,
)
from tooling.bench.server_memory import server_memory


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
    precision_workloads: dict[str, dict[str, Any]] = field(  # item 5: model -> overrides
        default_factory=lambda: PRECISION_WORKLOADS
    )
    precision_steps: int = 10
    precision_repeats: int = 3
    device_nodes: int = 3  # item 6: SuperNodes, as in the deployment test
    device_rounds: int = 3
    packing_updates: int = 8  # item 7: train jobs per variant
    packing_ks: tuple[int, ...] = (4, 8)  # item 7: pack sizes


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
    precision_workloads=QUICK_PRECISION_WORKLOADS,
    precision_steps=2,
    precision_repeats=2,
    device_rounds=2,
    packing_updates=4,
    packing_ks=(2, 4),
)


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
        parts.append(aggregation_report(results["server_aggregation"]))
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
    if "training_precision" in results:
        rows = [
            (
                f"{m['model']} ({m['task']})",
                name,
                m["batch_size"],
                m["steps"],
                1000 * v["median_step_seconds"],
                v["train_loss"],
                v["median_step_seconds"] / m["variants"]["fp32"]["median_step_seconds"],
            )
            for m in results["training_precision"]["models"]
            for name, v in m["variants"].items()
        ]
        parts.append(
            "## 5. Training precision, bf16 against fp32\n\n"
            + _table(
                ("model", "variant", "batch", "steps", "ms/step", "train loss", "time / fp32"),
                rows,
            )
        )
    if "device_messages" in results:
        item = results["device_messages"]
        rows = [
            (variant, kind, k["messages"], k["reply_seconds"], k["wall_seconds"], k["cpu_seconds"])
            for variant, v in item["variants"].items()
            for kind, k in v["kinds"].items()
        ]
        parts.append(
            f"## 6. Per-message device cost ({item['nodes']} SuperNodes, {item['rounds']} "
            "rounds)\n\n"
            + _table(("apps", "message", "messages", "reply s", "process s", "CPU s"), rows)
        )
    if "packing" in results:
        parts.append(packing_report(results["packing"]))
    return "\n\n".join(parts)


def _target(row: dict[str, Any]) -> str:
    """A row's item-3a target and whether it is met, e.g. ">= 50%: met"."""
    name = row["strategy"]
    if name in PERCENT_TARGETS:
        goal = PERCENT_TARGETS[name]
        met = row["percent_of_reference"] >= goal
        return f">= {goal}%: {'met' if met else 'not met'}"
    if name in ARITHMETIC_TARGETS:
        goal = ARITHMETIC_TARGETS[name]
        met = row["times_arithmetic"] <= goal
        return f"<= {goal:g}x arithmetic: {'met' if met else 'not met'}"
    return "-"


def aggregation_report(item: dict[str, Any]) -> str:
    """Item 3a's table: the reference row, then every strategy with its reply GB/s, its
    percentage of the reference timed beside it, its target and, where its products bound it,
    their GFLOP and its time over theirs."""
    reference = item["reference"]
    rows = [
        (
            "reference",
            reference["clients"],
            f"{reference['ranks'][0]}..{reference['ranks'][1]}",
            _mib(reference["reply_bytes"]),
            reference["seconds"],
            reference["gb_per_second"],
            "100",
            "-",
            "-",
            "-",
            "-",
            "plain in-place accumulation, median",
        )
    ]
    for r in item["strategies"]:
        rows.append(
            (
                r["strategy"],
                r["clients"],
                f"{r['ranks'][0]}..{r['ranks'][1]}",
                _mib(r["reply_bytes"]),
                r["seconds"],
                r["gb_per_second"],
                f"{r['percent_of_reference']:.0f}",
                _target(r),
                _mib(r["peak_bytes"]),
                f"{r['flops'] / 1e9:.3g} ({r['flops_dtype']})" if "flops" in r else "-",
                f"{r['times_arithmetic']:.2f}" if "flops" in r else "-",
                r["note"],
            )
        )
    headers = (
        "strategy",
        "clients",
        "ranks",
        "replies MiB",
        "s",
        "GB/s",
        "% of reference",
        "target",
        "peak MiB",
        "GFLOP",
        "x arithmetic",
        "note",
    )
    rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in item["gemm_flops_per_second"].items())
    return (
        f"## 3a. Server aggregation ({item['layers']} blocks x {len(item['block'])} "
        f"modules)\n\n"
        + _table(headers, rows)
        + f"\n\n% of reference: the reference's seconds on the same replies, timed in turn with "
        f"the strategy, over the strategy's (least of each); x arithmetic: seconds over GFLOP at "
        f"this machine's matrix-product GFLOP/s ({rates})"
    )


def packing_report(item: dict[str, Any]) -> str:
    """Item 7's table: the reference (one client per actor), then each pack size, with its
    updates/s and memory over the reference's and over the k actors that train k clients at
    once without packing."""
    s = item["settings"]
    first = item["variants"][0]
    rows = [
        (
            v["variant"],
            v["pack"],
            v["updates"],
            v["seconds"],
            v["updates_per_second"],
            f"{_mib(v['memory_bytes']):.0f}",
            v["base_copies"],
            f"{v['base_copies_same_concurrency']} / "
            f"{_mib(v.get('same_concurrency_memory_bytes', v['memory_bytes'])):.0f}",
            f"{v['updates_per_second_ratio']:.2f}",
            f"{v['memory_ratio']:.2f}",
            f"{v['memory_ratio_same_concurrency']:.2f}",
        )
        for v in item["variants"]
    ]
    headers = (
        "variant",
        "clients at once",
        "updates",
        "s",
        "updates/s",
        "peak MiB",
        "base copies",
        "one per actor, as many at once: bases / MiB",
        "updates/s / reference",
        "memory / reference",
        "memory / as many actors",
    )
    losses = ", ".join(
        f"k={v['pack']} {v['max_train_loss_difference']:.2g}" for v in item["variants"][1:]
    )
    return (
        f"## 7. Packed training against one client per actor ({s['model']}, {s['task']}; "
        f"{s['clients']} clients of ranks {s['ranks']}; {s['local_steps']} local steps of batch "
        f"{s['batch_size']}; {first.get('device_name', first['device'])}, {first['threads']} "
        "torch threads)\n\n"
        + _table(headers, rows)
        + f"\n\npeak MiB: {first['memory']} of the variant's own process. Without packing, k "
        "clients at once take k actors, each with a copy of the base (k x the reference's "
        f"peak). Max train-loss difference packed - alone: {losses}"
    )


def blas_threads(limit: int | None) -> contextlib.AbstractContextManager[Any]:
    """Item 3 runs BLAS with ``--cpus`` threads (one by default, like its single-threaded
    reference); None leaves BLAS as it is."""
    if limit is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def run_bench(
    items: Iterable[int] = ITEMS,
    quick: bool = False,
    out: str | Path = DEFAULT_OUT,
    scenario: str | Path = QUICKSTART,
    dense_modules: str = "per-shape",
    cpus: int = 1,
    baseline: str | Path | None = None,
) -> dict[str, Any]:
    """Run the chosen items in order, print their tables, write the JSON after each item."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    base = scenario
    scenario = scenarios.write_variant(base, out.parent / "scenario", sizes.workload)
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
        5: [
            (
                "training_precision",
                lambda: training_precision(
                    scenario,
                    sizes.precision_workloads,
                    sizes.precision_steps,
                    sizes.precision_repeats,
                    cpus,
                ),
            )
        ],
        6: [
            (
                "device_messages",
                lambda: device_messages(
                    scenario,
                    out.parent / "devices",
                    sizes.device_nodes,
                    sizes.device_rounds,
                    baseline,
                ),
            )
        ],
        7: [
            (
                "packing",
                lambda: packing_throughput(scenario, sizes.packing_updates, sizes.packing_ks, cpus),
            )
        ],
    }
    chosen = sorted(set(items))
    if 3 in chosen:
        results["item_3_blas_threads"] = cpus
    for item in chosen:
        for key, measure in steps[item]:
            print(f"hetfed bench: measuring {key} ...", file=sys.stderr, flush=True)
            with quiet_flower(), blas_threads(cpus if item == 3 else None):
                results[key] = measure()
            out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\nhetfed bench: results in {out}", file=sys.stderr)
    return results
