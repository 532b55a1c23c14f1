"""Item 4: bytes the strategy holds after registering 500 and 5,000 clients (budget queries
over :class:`~tooling.bench.common.SimulatedNodes`), and the bytes per client between the two."""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server_apps.run_plan import plan_run
from tooling import scenarios
from tooling.bench.common import SimulatedNodes, act_as_flower_task


def strategy_bytes_after_registration(scenario: str | Path, num_clients: int) -> tuple[int, float]:
    """Bytes a fresh strategy of the scenario holds once ``num_clients`` clients registered, and
    the seconds registration took.

    The strategy learns every budget through :meth:`LoRAStrategy.register_clients` over
    :class:`SimulatedNodes`, under tracemalloc; the bytes it holds are those freed when it is
    deleted (everything only it references: budgets, node and client id maps, counters).
    """
    act_as_flower_task()
    run_config = scenarios.scenario_run_config(scenario, [])
    plan = plan_run(run_config, project_dir=scenario)
    nodes = SimulatedNodes(num_clients, run_config, plan.settings.seed)
    gc.collect()
    tracemalloc.start()
    try:
        strategy = plan.build_strategy()
        started = time.perf_counter()
        strategy.register_clients(nodes)
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
