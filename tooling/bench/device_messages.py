"""Item 6: what one message costs a deployed device. A SuperLink and SuperNodes on loopback
(:mod:`tooling.loopback`, as the deployment test starts them) run the scenario; each SuperNode
starts one ``flwr-clientapp`` process per message, and a wrapper found first on PATH times each
of them: wall seconds from its start to its exit, and CPU seconds (user + system, its children
included). The SuperNode's log says which message each process answered: the budget query
first, then one train message a round. The model cache (``HETFED_CACHE``) starts empty, so the
first train message of a node builds the base model from its source and later ones may read
the prepared copy.

``baseline``: the same run, right before on the same machine, with the apps of another hetfed
checkout (e.g. the commit before a change) first on the processes' ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hetfed.model_cache import CACHE_ENV
from hetfed.profiles import load_profiles
from tooling import scenarios
from tooling.loopback import (
    BIN,
    Processes,
    free_ports,
    loopback_env,
    run_id_of,
    write_connection,
)

RUN_TIMEOUT = 3600
RECEIVED = re.compile(r"Receiving: (\w+) message")  # a SuperNode's log
SENT = "Sending: "
# One flwr-clientapp process: run the real one, then append its times to a JSON-lines log.
_WRAPPER = """#!{python}
import json, os, sys, time

started = time.time()
child = os.fork()
if child == 0:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
_, status, usage = os.wait4(child, 0)
address = sys.argv[sys.argv.index("--runtime-api-address") + 1]
record = {{
    "port": int(address.rsplit(":", 1)[1]),
    "started": started,
    "wall_seconds": time.time() - started,
    "cpu_seconds": usage.ru_utime + usage.ru_stime,
    "peak_rss_kib": usage.ru_maxrss,
}}
with open({log!r}, "a") as log:
    log.write(json.dumps(record) + "\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def device_messages(
    scenario: str | Path,
    folder: str | Path,
    nodes: int,
    rounds: int,
    baseline: str | Path | None = None,
) -> dict[str, Any]:
    """Every message's wall and CPU seconds on ``nodes`` SuperNodes over ``rounds`` rounds, for
    this checkout and, run first, for ``baseline``; each message kind's mean."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    checkouts = [("baseline", Path(baseline).resolve())] if baseline is not None else []
    variants = {
        name: _deployed_run(scenario, folder / name, nodes, rounds, checkout)
        for name, checkout in [*checkouts, ("current", None)]
    }
    return {"nodes": nodes, "rounds": rounds, "variants": variants}


def _deployed_run(
    scenario: str | Path, folder: Path, nodes: int, rounds: int, checkout: Path | None
) -> dict[str, Any]:
    folder.mkdir(parents=True)
    config = scenarios.scenario_run_config(scenario, [])
    overrides = {
        **scenarios.absolute_paths(config),
        "num-server-rounds": rounds,
        "min-available-nodes": nodes,
        "min-train-nodes": nodes,
        "fraction-train": 1.0,
        "round-timeout": RUN_TIMEOUT,
        "resume": False,
        "results-dir": str(folder / "results"),
    }
    variant = scenarios.write_variant(scenario, folder / "scenario", overrides)
    tiers = list(load_profiles(Path(scenario) / str(config["profiles"])).tiers)

    log = folder / "clientapps.jsonl"
    wrappers = folder / "bin"
    wrappers.mkdir()
    wrapper = wrappers / "flwr-clientapp"
    real = str(BIN / "flwr-clientapp")
    wrapper.write_text(_WRAPPER.format(python=sys.executable, real=real, log=str(log)))
    wrapper.chmod(0o755)
    (folder / "flwr-home").mkdir()
    env = loopback_env(folder / "flwr-home")
    env["PATH"] = f"{wrappers}{os.pathsep}{env['PATH']}"
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))

    # model caches, empty: the server's, and the devices' (their first load is a cold one)
    procs = Processes(folder, {**env, CACHE_ENV: str(folder / "server-model-cache")})
    link_port, *node_ports = free_ports(1 + nodes)
    names = {}
    try:
        procs.superlink(link_port, "--insecure")
        procs.env = {**env, CACHE_ENV: str(folder / "device-model-cache")}
        for i, port in enumerate(node_ports):
            names[port] = name = f"node-{i}"
            node_config = f"tier='{tiers[i % len(tiers)]}' partition-id={i} num-partitions={nodes}"
            procs.supernode(name, link_port, port, node_config, "--insecure")
        write_connection(env, "bench", f"127.0.0.1:{link_port}", ca=None)
        procs.wait_for_nodes(nodes)
        output, replied = _run_and_watch(procs, variant, list(names.values()))
        status = scenarios.run_status(run_id_of(output), env)
        if status != "finished:completed":
            raise RuntimeError(f"the run ended {status}; see {folder / 'flwr-run.log'}")
    finally:
        procs.stop_all()
    messages = _messages(log, procs, names, replied)
    return {
        "checkout": str(checkout) if checkout is not None else "this checkout",
        "messages": messages,
        "kinds": _by_kind(messages),
    }


def _run_and_watch(
    procs: Processes, scenario: Path, nodes: list[str]
) -> tuple[str, dict[str, list[float]]]:
    """``flwr run`` the scenario; meanwhile note when each SuperNode logs that it sends a
    reply (polled every 0.2 s). Returns the run's output and those times."""
    replied: dict[str, list[float]] = {name: [] for name in nodes}
    out_path = procs.folder / "flwr-run.log"
    with out_path.open("w") as out:
        run = subprocess.Popen(
            [BIN / "flwr", "run", scenario, "bench", "--stream"],
            cwd=procs.folder,
            env=procs.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while run.poll() is None and time.monotonic() < deadline:
            for name, times in replied.items():
                now, sent = time.time(), procs.log(name).count(SENT)
                times += [now] * (sent - len(times))
            time.sleep(0.2)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return out_path.read_text(), replied


def _messages(
    log: Path, procs: Processes, names: dict[int, str], replied: dict[str, list[float]]
) -> list[dict[str, Any]]:
    """The timed processes, each named by its node and the message that node received, with
    the seconds from its start to the node's sending of its reply."""
    timed = [json.loads(line) for line in log.read_text().splitlines()]
    messages = []
    for port, name in names.items():
        kinds = RECEIVED.findall(procs.log(name))
        mine = sorted((t for t in timed if t["port"] == port), key=lambda t: t["started"])
        if not len(kinds) == len(mine) == len(replied[name]):
            raise RuntimeError(f"{name} received {kinds} but ran {len(mine)} ClientApps")
        trains = 0
        for kind, times, sent in zip(kinds, mine, replied[name], strict=True):
            trains += kind == "train"
            label = f"train {trains}" if kind == "train" else kind
            reply = {"reply_seconds": sent - times["started"]}
            messages.append({"node": name, "message": label, **reply, **times})
    return messages


def _by_kind(messages: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean wall and CPU seconds of the query, the first train message and the later ones."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for message in messages:
        kind = {"query": "query", "train 1": "first train"}.get(message["message"], "later trains")
        groups.setdefault(kind, []).append(message)
    return {
        kind: {
            "messages": len(group),
            "reply_seconds": statistics.mean(m["reply_seconds"] for m in group),
            "wall_seconds": statistics.mean(m["wall_seconds"] for m in group),
            "cpu_seconds": statistics.mean(m["cpu_seconds"] for m in group),
        }
        for kind, group in groups.items()
    }
