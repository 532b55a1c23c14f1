"""Scenarios: read one, check it, write a variant of it, and run it through ``flwr run``.

A scenario is a configuration-only Flower app folder (``pyproject.toml`` with the run config in
``[tool.flwr.app.config]`` and hetfed's simulation settings in ``[tool.hetfed.simulation]``, and
a device profile file). ``hetfed check``/``run``, sweeps and the benchmarks all use these
functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import tomli_w
from flwr.common.config import flatten_dict, parse_config_args, unflatten_dict

from hetfed.config import RunSettings
from hetfed.errors import HetfedError
from server_apps.run_plan import RunPlan, plan_run
from strategies.registry import strategy_names
from tooling.superlink import describe_target

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


def check(folder: str | Path, overrides: list[str]) -> RunPlan:
    """Validate a scenario (:func:`server_apps.run_plan.plan_run`) and say what it will run."""
    plan = plan_run(scenario_run_config(folder, overrides), project_dir=folder)
    tiers = ", ".join(f"{t.name}={t.rank}" for t in plan.profiles.tiers.values())
    print(
        f"ok: strategy {plan.settings.strategy}, tiers {tiers}, "
        f"rank limit {plan.max_rank}, {plan.settings.num_server_rounds} rounds"
    )
    for budget in plan.budgets:  # what each tier trains and what that costs on its device
        derived = " (derived)" if budget.tier in plan.derived_tiers else ""
        memory = plan.profiles.tiers[budget.tier].memory_gb
        print(f"  {budget.describe(plan.clock.shape.blocks, memory)}{derived}")
    return plan


def variant_config(base: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """Scenario ``base``'s flat run config with the values of ``config`` set; choosing another
    ``strategy`` drops the options of the other registered strategies (the run config would
    reject them)."""
    app = read_scenario(base)["tool"]["flwr"]["app"]
    flat = {**flatten_dict(app.get("config", {})), **config}
    others = set(strategy_names()) - {flat.get("strategy", RunSettings.strategy)}
    return {k: v for k, v in flat.items() if k.split(".")[0] not in others}


def write_variant(
    base: str | Path,
    folder: str | Path,
    config: dict[str, Any],
    simulation: dict[str, Any] | None = None,
) -> Path:
    """A copy of scenario ``base`` in ``folder`` (every file but results and hidden ones) whose
    run config is :func:`variant_config` and whose ``[tool.hetfed.simulation]`` has the values
    of ``simulation``; the Flower app gets a name of its own."""
    base, folder = Path(base), Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("results", ".*"))
    doc = read_scenario(base)
    doc["tool"]["flwr"]["app"]["config"] = unflatten_dict(variant_config(base, config))
    doc["tool"].setdefault("hetfed", {}).setdefault("simulation", {}).update(simulation or {})
    # Flower app names: a letter first, letters, digits and hyphens, at most 32 characters.
    doc["project"]["name"] = f"hetfed-variant-{hashlib.sha1(str(folder).encode()).hexdigest()[:12]}"
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    return folder


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def absolute_paths(config: dict[str, Any]) -> dict[str, str]:
    """The relative paths of ``config``'s :data:`CWD_RELATIVE_KEYS`, made absolute from here
    (``results-dir`` always, the others when they exist), for Flower processes started
    elsewhere."""
    found = {}
    for key in CWD_RELATIVE_KEYS:
        value = config.get(key)
        if (
            isinstance(value, str)
            and value
            and not Path(value).is_absolute()
            and (key == "results-dir" or Path(value).exists())
        ):
            found[key] = str(Path(value).resolve())
    return found


def run(folder: str | Path, overrides: list[str]) -> int:
    """Run a scenario through ``flwr run``; return 0 only if Flower reports it completed."""
    config = scenario_run_config(folder, overrides)
    check(folder, overrides)
    absolute = absolute_paths(config).items()
    overrides = [*overrides, *(f"{key}={json.dumps(value)}" for key, value in absolute)]
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()}}
    # flwr starts `flower-superlink` from PATH: make it this environment's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    federation = " ".join(f"{k}={_toml_value(v)}" for k, v in simulation_settings(folder).items())
    target, warning = describe_target(env)
    print(f"hetfed: this run goes to {target}")
    if warning is not None:
        print(f"hetfed: warning: {warning}", file=sys.stderr)
    command = ["flwr", "run", str(folder), "--stream"]
    if overrides:
        # one --run-config: flwr (1.41, 1.42) parses each flag on its own and merges them shallowly,
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
