"""The ``hetfed`` command: list strategies, check a scenario, run it and check how it ended.

- ``hetfed strategies``: every registered strategy (name, class, package, one-line description;
  a plugin that cannot be used is listed with the reason).
- ``hetfed check scenarios/NAME [-c KEY=VALUE ...]``: validate a scenario without running it.
- ``hetfed run scenarios/NAME [-c KEY=VALUE ...]``: ``flwr run`` it offline on the local
  Simulation Engine with the scenario's ``[tool.hetfed.simulation]`` settings, stream its log,
  and exit non-zero unless the run's status is ``finished:completed``.
- ``hetfed table RESULTS_DIR ...``: a Markdown table comparing finished runs.
- ``hetfed sweep SWEEP.yaml [--out DIR]``: run a scenario over strategies, options and seeds
  (see :mod:`hetfed.sweep`), skipping finished runs, and write one comparison table and plot.
- ``hetfed bench [--quick] [--items 1,2,3,4] [--out FILE]``: measure the cost model (client
  updates/s, framework overhead, server aggregation, server memory per client; see
  :mod:`hetfed.bench`), print tables and write JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
from flwr.common.config import flatten_dict, parse_config_args

from hetfed.errors import HetfedError

OFFLINE_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}
SIMULATION_KEYS = (
    "num-supernodes",
    "client-resources-num-cpus",
    "client-resources-num-gpus",
    "init-args-num-cpus",
    "init-args-num-gpus",
)
# Relative paths in these keys mean "relative to where hetfed run was started".
CWD_RELATIVE_KEYS = ("results-dir", "data.source", "resume")


def read_scenario(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "pyproject.toml"
    if not path.is_file():
        raise HetfedError(f"{folder} is not a scenario folder: {path} does not exist")
    with path.open("rb") as handle:
        return tomllib.load(handle)


def scenario_run_config(folder: str | Path, overrides: list[str]) -> dict[str, Any]:
    """The scenario's flat run config with ``--run-config`` style overrides applied."""
    doc = read_scenario(folder)
    config = flatten_dict(doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))
    extra = {}
    for override in overrides:
        try:
            extra.update(parse_config_args([override]))
        except click.ClickException as err:
            raise HetfedError(
                f"-c {override}: not KEY=VALUE with a TOML value (true/false, a number, or a "
                f'quoted string such as results-dir="out/run")'
            ) from err
    unknown = sorted(set(extra) - set(config))
    if unknown:  # flwr itself refuses these; say so before starting anything
        raise HetfedError(
            f"--run-config key '{unknown[0]}' is not in the scenario's "
            f"[tool.flwr.app.config]; known keys: {', '.join(sorted(config))}"
        )
    config.update(extra)
    return config


def simulation_settings(folder: str | Path) -> dict[str, Any]:
    doc = read_scenario(folder)
    settings = doc.get("tool", {}).get("hetfed", {}).get("simulation", {})
    for key in settings:
        if key not in SIMULATION_KEYS:
            raise HetfedError(
                f"{folder}/pyproject.toml: [tool.hetfed.simulation] key '{key}' "
                f"is unknown; allowed: {', '.join(SIMULATION_KEYS)}"
            )
    return settings


def check(folder: str | Path, overrides: list[str]) -> None:
    from hetfed.run_plan import plan_run

    plan = plan_run(scenario_run_config(folder, overrides), project_dir=folder)
    tiers = ", ".join(f"{t.name}={t.rank}" for t in plan.profiles.tiers.values())
    print(
        f"ok: strategy {plan.settings.strategy}, tiers {tiers}, "
        f"rank limit {plan.max_rank}, {plan.settings.num_server_rounds} rounds"
    )


def _toml_value(value: Any) -> str:
    return (
        json.dumps(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def run(folder: str | Path, overrides: list[str]) -> int:
    """Run a scenario through ``flwr run``; return 0 only if Flower reports it completed."""
    config = scenario_run_config(folder, overrides)
    check(folder, overrides)
    for key in CWD_RELATIVE_KEYS:
        value = config.get(key)
        if (
            isinstance(value, str)
            and value
            and not Path(value).is_absolute()
            and (key == "results-dir" or Path(value).exists())
        ):
            overrides = [*overrides, f"{key}={json.dumps(str(Path(value).resolve()))}"]
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}}
    # flwr starts `flower-superlink` from PATH: make it this environment's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    federation = " ".join(f"{k}={_toml_value(v)}" for k, v in simulation_settings(folder).items())
    command = ["flwr", "run", str(folder), "--stream"]
    if overrides:
        # one --run-config: flwr 1.41 parses each flag on its own and merges them shallowly,
        # so a second data.* override would replace the first one's whole data section
        command += ["--run-config", " ".join(overrides)]
    if federation:
        command += ["--federation-config", federation]
    run_id = None
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                match = re.search(r"Successfully started run (\d+)", line)
                run_id = run_id or (match.group(1) if match else None)
        except KeyboardInterrupt:
            # The run lives in the SuperLink, not in this process: stop it there too.
            if run_id is not None:
                subprocess.run(["flwr", "stop", run_id], env=env, check=False)
            raise
    if process.returncode != 0 or run_id is None:
        print(f"hetfed: flwr run failed (exit code {process.returncode})", file=sys.stderr)
        return process.returncode or 1
    status = run_status(run_id, env)
    print(f"hetfed: run {run_id} ended with status {status}")
    return 0 if status == "finished:completed" else 1


def run_status(run_id: str, env: dict[str, str] | None = None) -> str:
    """Flower's status of a run, e.g. ``finished:completed`` or ``finished:failed``."""
    out = subprocess.run(
        ["flwr", "ls", "--run-id", str(run_id), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    runs = json.loads(out[out.index("{") :]).get("runs", []) if "{" in out else []
    return runs[0]["status"] if runs else "unknown"


def list_strategies() -> None:
    from hetfed.registry import describe_strategies

    table = [("name", "class", "package", "description")] + [
        (r.name, r.target, r.package, f"BROKEN PLUGIN: {r.error}" if r.error else r.description)
        for r in describe_strategies()
    ]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    for *cells, text in table:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)), text, sep="  ")


def _bench_items(text: str) -> tuple[int, ...]:
    items = tuple(sorted({int(i) for i in text.split(",") if i.strip()}))
    if not items or not set(items) <= {1, 2, 3, 4}:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated items among 1, 2, 3, 4")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetfed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("strategies", help="list the registered strategies")
    for name, text in (
        ("check", "validate a scenario without running it"),
        ("run", "run a scenario offline and check its final status"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("scenario", help="a scenario folder, e.g. scenarios/quickstart")
        cmd.add_argument(
            "-c",
            "--run-config",
            action="append",
            default=[],
            help="override, e.g. -c 'num-server-rounds=3' (repeatable)",
        )
    sweep = sub.add_parser("sweep", help="run a scenario over strategies/options/seeds")
    sweep.add_argument("file", help="a sweep YAML file")
    sweep.add_argument("--out", help="results folder (default: results/<sweep file name>)")
    table = sub.add_parser("table", help="compare finished runs in a Markdown table")
    table.add_argument("results", nargs="+", help="results folders (with summary.json)")
    bench = sub.add_parser("bench", help="measure the cost model (see docs/benchmarks.md)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery")
    bench.add_argument(
        "--items",
        type=_bench_items,
        default=(1, 2, 3, 4),
        help="comma-separated items: 1 client updates/s, 2 framework overhead, "
        "3 server aggregation, 4 server memory per client (default: all)",
    )
    bench.add_argument(
        "--out", default="results/bench/bench.json", help="JSON file (default: %(default)s)"
    )
    bench.add_argument(
        "--scenario",
        default="scenarios/quickstart",
        help="scenario of items 1, 2 and 4 (default: %(default)s)",
    )
    bench.add_argument(
        "--dense-modules",
        choices=("per-shape", "all"),
        default="per-shape",
        help="item 3: modules of the 7B block that also get the dense SVD (default: %(default)s)",
    )
    bench.add_argument(
        "--cpus", type=int, default=1, help="item 2: CPUs of the one simulation worker"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "strategies":
            list_strategies()
            return 0
        if args.command == "sweep":
            from hetfed.sweep import load_sweep, run_sweep

            plan = load_sweep(args.file)
            out = Path(args.out or Path("results") / Path(args.file).stem)
            rows = run_sweep(plan, out)
            print((out / "comparison.md").read_text())
            return 0 if all(r["status"] == "completed" for r in rows) else 1
        if args.command == "bench":
            from hetfed.bench import run_bench

            run_bench(
                args.items, args.quick, args.out, args.scenario, args.dense_modules, args.cpus
            )
            return 0
        if args.command == "table":
            from hetfed.results import summary_table

            print(summary_table(args.results))
            return 0
        if args.command == "check":
            check(args.scenario, args.run_config)
            return 0
        return run(args.scenario, args.run_config)
    except (HetfedError, ValueError) as err:
        print(f"hetfed: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
