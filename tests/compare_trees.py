"""Behaviour unchanged across a refactor: run the same configurations in two trees, compare.

    python -m tests.compare_trees --base <commit> [--out compare-out]

checks out ``<commit>`` as a git worktree, then runs every configuration of :data:`CONFIGS` (a
tiny model, 4 clients, 3 rounds, through ``hetfed run`` and the Simulation Engine) once with the
base tree's code and once with this tree's (``PYTHONPATH`` names the tree; each tree has its own
FLWR_HOME and SuperLink port, and every process the run starts inherits both), and compares

- the global state after the last round (``checkpoint.npz``'s arrays), bit for bit, and
- the round statistics of ``metrics.jsonl``, every key both trees write but wall-clock times.

It prints one line per configuration and exits non-zero on any difference. Not a pytest test
(it takes minutes); the closing note of a refactor cites its output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tests.conftest import REPO, TINY_CONFIG, write_scenario, write_topics_corpus
from tooling.loopback import free_ports
from tooling.superlink import stop_superlinks_on

CONFIGS: dict[str, dict] = {
    "hetlora": {"strategy": "hetlora"},
    "hetlora-unconverted": {"strategy": "hetlora", "lora.rescale": False},
    "hetlora-rslora": {"strategy": "hetlora", "lora.scaling": "rslora"},
    "fedit": {"strategy": "fedit"},
    "zeropad": {"strategy": "zeropad"},
    "helora-pad": {"strategy": "helora-pad"},
    "helora-kd": {"strategy": "helora-kd", "data.server-examples": 64},
    "flora": {"strategy": "flora"},
    "flexlora": {"strategy": "flexlora"},
    "rbla": {"strategy": "rbla"},
    "gd-hla": {"strategy": "gd-hla"},
    "rgd-hla": {"strategy": "rgd-hla"},
    "fim-hla": {
        "strategy": "fim-hla",
        "data.server-examples": 16,
        "fim-hla.examples": 16,
        "fim-hla.period": 1,
        "fim-hla.first-round": 1,
    },
    # faults and retries: the round's attempts and what was sent (RoundState)
    "hetlora-faults": {
        "strategy": "hetlora",
        "faults.fraction": 0.5,
        "faults.kinds": "nan,shape",
        "min-train-replies": 3,
    },
    "fedit-validation": {"strategy": "fedit", "data.validation-examples": 60},
}
LAYER_PROFILES = """\
tiers:
  small: {rank: 2, layers: 1}
  medium: {rank: 4, layers: 1}
  large: {rank: 8}
assignment:
  ratios: {small: 2, medium: 1, large: 1}
"""
WALL_CLOCK = {"seconds", "train_seconds"}


def run_config(tree: Path, name: str, keys: dict, corpus: Path, work: Path, env: dict) -> Path:
    """One run of configuration ``name`` with the code of ``tree``; its results folder."""
    config = {**TINY_CONFIG, "data.source": str(corpus), **keys, "results-dir": "results"}
    profiles = LAYER_PROFILES if name.endswith("hla") else None
    folder = work / name
    scenario = write_scenario(folder / "scenario", config, *([profiles] if profiles else []))
    command = [sys.executable, "-m", "tooling.cli", "run", str(scenario)]
    proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} in {tree} failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return folder / "results"


def fingerprint(results: Path) -> dict:
    """The global state's arrays (sha256 of each) and the round statistics of a run, and
    whether its ServerApp wrote process.json (trees from before it did not: a sign that the
    run used the tree's code)."""
    with np.load(results / "checkpoint.npz") as stored:
        state = {
            key: hashlib.sha256(np.ascontiguousarray(stored[key]).tobytes()).hexdigest()
            for key in stored.files
            if key.startswith("state/")
        }
    lines = (results / "metrics.jsonl").read_text().splitlines()
    rounds = [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in lines]
    return {"state": state, "rounds": rounds, "process": (results / "process.json").is_file()}


def differences(base: dict, this: dict) -> list[str]:
    found = []
    if base["state"] != this["state"]:
        changed = sorted(k for k in base["state"].keys() | this["state"].keys()
                         if base["state"].get(k) != this["state"].get(k))  # fmt: skip
        found.append(f"global state differs in {changed[:4]}")
    if len(base["rounds"]) != len(this["rounds"]):
        found.append("a different number of rounds")
    for old, new in zip(base["rounds"], this["rounds"], strict=False):
        for key in old.keys() & new.keys():
            if old[key] != new[key]:
                found.append(f"round {old['round']} {key}: {old[key]} != {new[key]}")
    return found


def tree_env(tree: Path, home: Path) -> tuple[dict, int]:
    link, control = free_ports(2)
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(link),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    return env, link


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare this tree with")
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    args = parser.parse_args()
    names = args.only or list(CONFIGS)
    with tempfile.TemporaryDirectory(prefix="hetfed-compare-") as scratch:
        root = Path(scratch)
        base_tree = root / "base-tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base],
                       cwd=REPO, check=True, capture_output=True)  # fmt: skip
        corpus = write_topics_corpus(root / "topics")
        failed = 0
        try:
            prints = {}
            for label, tree in (("this", REPO), ("base", base_tree)):
                env, link = tree_env(tree, root / f"flwr-{label}")
                prints[label] = {}
                try:
                    for name in names:
                        try:
                            results = run_config(
                                tree, name, CONFIGS[name], corpus, root / label, env
                            )
                        except RuntimeError as err:  # a row of the report, not the end of it
                            print(err, file=sys.stderr)
                            continue
                        prints[label][name] = fingerprint(results)
                finally:
                    stop_superlinks_on(link)
            for name in names:
                if name not in prints["base"] or name not in prints["this"]:
                    print(f"{name}: FAILED in {[k for k in prints if name not in prints[k]]}")
                    failed += 1
                    continue
                found = differences(prints["base"][name], prints["this"][name])
                rounds = len(prints["this"][name]["rounds"]) - 1
                arrays = len(prints["this"][name]["state"])
                verdict = "identical" if not found else "DIFFERENT: " + "; ".join(found[:5])
                print(f"{name}: {rounds} rounds, {arrays} arrays: {verdict}")
                failed += bool(found)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO,
                           check=False, capture_output=True)  # fmt: skip
        for label in prints:
            wrote = sum(p["process"] for p in prints[label].values())
            print(f"{label}: {wrote} of {len(names)} runs wrote process.json")
    print(f"{len(names) - failed} of {len(names)} configurations bit-identical to {args.base}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
