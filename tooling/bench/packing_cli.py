"""``python -m tooling.bench.packing_cli``: item 7 (:mod:`tooling.bench.packing`) on a scenario
variant of any model, number of clients and pack sizes, on this machine's device (the GPU script
``tooling/bench/packing_gpu.sh`` runs it for SmolLM2-135M and a larger local model)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.common.config import parse_config_args

from hetfed.models import CAUSAL_TASKS
from tooling import scenarios
from tooling.bench.command import packing_report
from tooling.bench.common import DEFAULT_OUT, QUICKSTART, WORKLOAD, machine, quiet_flower
from tooling.bench.packing import CAUSAL_WORKLOADS, packing_throughput


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tooling.bench.packing_cli",
        description="Item 7 of hetfed bench on a scenario variant of any model and number of "
        "clients, on this machine's device (the GPU when torch sees one).",
    )
    parser.add_argument("--scenario", default=str(QUICKSTART), help="(default: %(default)s)")
    parser.add_argument(
        "--model", help="model.name: a built-in name or a local folder (default: the scenario's)"
    )
    parser.add_argument(
        "--task",
        choices=("classification", *CAUSAL_TASKS),
        default="classification",
        help="instruction or generation: a causal LM on BBC News, with the settings of "
        "scenarios/hetlora-smollm2 (LoRA on q,k,v,o, batch 8) (default: %(default)s)",
    )
    parser.add_argument("--clients", type=int, default=32, help="num-supernodes, all sampled")
    parser.add_argument("--updates", type=int, help="jobs per variant (default: --clients)")
    parser.add_argument("--ks", default="8,16,32", help="pack sizes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT.parent / "packing.json"), help="(default: %(default)s)"
    )
    parser.add_argument(
        "-c", "--run-config", action="append", default=[], help="KEY=VALUE (TOML value)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {**WORKLOAD, "min-available-nodes": args.clients}
    if args.task in CAUSAL_TASKS:
        config |= CAUSAL_WORKLOADS[args.task]
    if args.model:
        config["model.name"] = args.model
    config |= parse_config_args(args.run_config)
    scenario = scenarios.write_variant(
        args.scenario, out.parent / f"{out.stem}-scenario", config, {"num-supernodes": args.clients}
    )
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    ks = tuple(int(k) for k in args.ks.split(",") if k.strip())
    with quiet_flower():
        item = packing_throughput(scenario, args.updates or args.clients, ks, args.threads)

    command = " ".join(["python -m tooling.bench.packing_cli", *(argv or sys.argv[1:])])
    results = {"command": command, "machine": machine(), "packing": item}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(packing_report(item))
    print(f"\nresults in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
