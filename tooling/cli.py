"""The ``hetfed`` command: arguments only; the work is done by the modules each subcommand names.

- ``hetfed strategies``: every registered strategy (name, class, package, one-line description;
  a plugin that cannot be used is listed with the reason), :mod:`strategies.registry`.
- ``hetfed check scenarios/NAME [-c KEY=VALUE ...]``: validate a scenario without running it.
- ``hetfed run scenarios/NAME [-c KEY=VALUE ...]``: ``flwr run`` it offline on the local
  Simulation Engine with the scenario's ``[tool.hetfed.simulation]`` settings, stream its log,
  and exit non-zero unless the run's status is ``finished:completed`` (:mod:`tooling.scenarios`).
- ``hetfed table RESULTS_DIR ...``: a Markdown table comparing finished runs.
- ``hetfed costs scenarios/NAME [--ranks 1,2,4]``: what each rank and layer budget costs a
  client of the scenario's model: FLOPs, peak memory, bytes (:mod:`tooling.costs`).
- ``hetfed sweep SWEEP.yaml [--out DIR] [--runs a,b] [--seeds 1,2,3]``: run a scenario over
  strategies, options and seeds (:mod:`tooling.sweep`), skipping finished runs (and the rows and
  seeds ``--runs``/``--seeds`` leave out), and write the comparison tables and plots.
- ``hetfed bench [--quick] [--items 1,2,3,4,5,6,7] [--out FILE]``: measure the cost model
  (client updates/s, framework overhead, server aggregation, server memory per client, bf16
  against fp32 training steps, per-message device cost, packed training;
  :mod:`tooling.bench`), print tables and write JSON.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from hetfed.errors import HetfedError
from tooling.bench import ITEMS as BENCH_ITEMS


def _integers(
    text: str, allowed: str, accept: Callable[[int], bool] = lambda number: True
) -> tuple[int, ...]:
    """Comma-separated integers, sorted without repeats; ``allowed`` says what may be given."""
    try:
        numbers = tuple(sorted({int(i) for i in text.split(",") if i.strip()}))
    except ValueError:
        numbers = ()
    if not numbers or not all(accept(number) for number in numbers):
        raise argparse.ArgumentTypeError(f"{text!r}: {allowed}")
    return numbers


def _ranks(text: str) -> tuple[int, ...]:
    return _integers(text, "comma-separated integers >= 1", lambda rank: rank >= 1)


def _seeds(text: str) -> list[int]:
    return list(_integers(text, "comma-separated integer seeds"))


def _bench_items(text: str) -> tuple[int, ...]:
    return _integers(
        text,
        f"comma-separated items among {', '.join(map(str, BENCH_ITEMS))}",
        lambda item: item in BENCH_ITEMS,
    )


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated row names")
    return names


def parser() -> argparse.ArgumentParser:
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
    sweep.add_argument(
        "--runs", type=_names, help="run only these rows now, e.g. fedit,florist (default: all)"
    )
    sweep.add_argument(
        "--seeds", type=_seeds, help="run only these seeds now, e.g. 1,2,3 (default: all)"
    )
    costs = sub.add_parser("costs", help="FLOPs, memory and bytes of each rank and layer budget")
    costs.add_argument("scenario", help="a scenario folder, e.g. scenarios/quickstart")
    costs.add_argument(
        "--ranks", type=_ranks, default=(1, 2, 4, 8, 16, 32, 64), help="e.g. 1,2,4,8"
    )
    table = sub.add_parser("table", help="compare finished runs in a Markdown table")
    table.add_argument("results", nargs="+", help="results folders (with summary.json)")
    bench = sub.add_parser("bench", help="measure the cost model (see docs/benchmarks.md)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery")
    bench.add_argument(
        "--items",
        type=_bench_items,
        default=BENCH_ITEMS,
        help="comma-separated items: 1 client updates/s, 2 framework overhead, "
        "3 server aggregation, 4 server memory per client, 5 bf16 against fp32 training "
        "steps, 6 per-message device cost, 7 packed training against one client per actor "
        "(default: all)",
    )
    bench.add_argument(
        "--out", default="results/bench/bench.json", help="JSON file (default: %(default)s)"
    )
    bench.add_argument(
        "--scenario",
        default="scenarios/quickstart",
        help="scenario of items 1, 2, 4, 5, 6 and 7 (default: %(default)s)",
    )
    bench.add_argument(
        "--dense-modules",
        choices=("per-shape", "all"),
        default="per-shape",
        help="item 3: modules of the 7B block that also get the dense SVD (default: %(default)s)",
    )
    bench.add_argument(
        "--cpus",
        type=int,
        default=1,
        help="item 2: CPUs of the one simulation worker; item 3: BLAS threads; item 5: torch "
        "threads (default: %(default)s)",
    )
    bench.add_argument(
        "--baseline",
        help="item 6: also measure the apps of this hetfed checkout (e.g. an older commit), "
        "first, on the same machine",
    )
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM (``kill``, a scheduler's stop; a background job ignores Ctrl-C) stops a run as
    # Ctrl-C does: :func:`tooling.scenarios.run` then stops the Flower run in the SuperLink too,
    # rather than leaving it training there
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "strategies":
            from strategies.registry import strategies_table

            print(strategies_table())
            return 0
        if args.command == "sweep":
            from tooling.sweep import load_sweep, run_sweep

            out = Path(args.out or Path("results") / Path(args.file).stem)
            rows = run_sweep(load_sweep(args.file), out, args.runs, args.seeds)
            print((out / "comparison.md").read_text())
            return 0 if all(r["status"] == "completed" for r in rows) else 1
        if args.command == "bench":
            from tooling.bench.command import run_bench

            run_bench(
                args.items,
                args.quick,
                args.out,
                args.scenario,
                args.dense_modules,
                args.cpus,
                args.baseline,
            )
            return 0
        if args.command == "costs":
            from tooling.costs import costs_table

            print(costs_table(args.scenario, args.ranks))
            return 0
        if args.command == "table":
            from tooling.sweep import results_table

            print(results_table(args.results))
            return 0
        from tooling import scenarios

        if args.command == "check":
            scenarios.check(args.scenario, args.run_config)
            return 0
        return scenarios.run(args.scenario, args.run_config)
    except (HetfedError, ValueError) as err:
        print(f"hetfed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hetfed: stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
