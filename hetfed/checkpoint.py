"""Checkpoints: a run's state after every round, written atomically, and resuming from them.

One file, ``<results-dir>/checkpoint.npz``, holds the global arrays (keys ``state/<name>``) and
one JSON document (key ``meta``): the round, the strategy's name and its
:meth:`~strategies.base.LoRAStrategy.state_dict`, the per-round records so far, the seconds
spent, the run config and the tier of every client that reported a budget. It is written to a
temporary file and renamed over the previous one, so a run killed at any moment leaves the last
complete checkpoint behind.

There is no RNG state to save: every draw (sampling, faults, layer draws, fresh LoRA factors,
client training) is seeded by (seed, round, attempt, client id), so a resumed run makes the
same draws as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hetfed.adapter_state import State
from hetfed.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.npz"
_STATE_PREFIX = "state/"
# Run-config keys a resumed run may change: none of them changes what a round computes.
MAY_CHANGE_ON_RESUME = ("resume", "num-server-rounds", "results-dir", "round-timeout")


@dataclass
class Checkpoint:
    server_round: int  # the last completed round
    state: State  # the global state after that round
    strategy: str
    strategy_state: dict[str, Any]
    records: list[dict[str, Any]]  # metrics.jsonl lines up to that round
    seconds: float  # time the run has spent so far
    run_config: dict[str, Any]
    # client id -> tier of every client that reported a budget so far (for summary.json; a
    # resumed run asks the nodes again before it trains)
    node_budgets: dict[str, str] = field(default_factory=dict)


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``folder/checkpoint.npz`` atomically (a temporary file renamed over the old one)."""
    path = Path(folder) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {
        "round": checkpoint.server_round,
        "strategy": checkpoint.strategy,
        "strategy_state": checkpoint.strategy_state,
        "records": checkpoint.records,
        "seconds": checkpoint.seconds,
        "run_config": checkpoint.run_config,
        "node_budgets": checkpoint.node_budgets,
    }
    arrays = {_STATE_PREFIX + key: value for key, value in checkpoint.state.items()}
    with tmp.open("wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The checkpoint in ``folder``, or None when there is none."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        state = {
            key[len(_STATE_PREFIX) :]: data[key]
            for key in data.files
            if key.startswith(_STATE_PREFIX)
        }
    return Checkpoint(
        server_round=int(meta["round"]),
        state=state,
        strategy=meta["strategy"],
        strategy_state=meta["strategy_state"],
        records=meta["records"],
        seconds=float(meta["seconds"]),
        run_config=meta["run_config"],
        node_budgets=meta.get("node_budgets", {}),  # absent in checkpoints of older versions
    )


def resume_folder(resume: bool | str, results_dir: str) -> Path | None:
    """Where a run resumes from: ``results-dir`` for ``resume = true``, a named folder, or None."""
    if resume is False:
        return None
    return Path(results_dir if resume is True else resume)


def check_resumable(checkpoint: Checkpoint, run_config: Mapping[str, Any], source: Path) -> None:
    """A checkpoint continues only the run that wrote it: the same config but for
    :data:`MAY_CHANGE_ON_RESUME`; the first difference is an error naming the key."""
    keys = (set(checkpoint.run_config) | set(run_config)) - set(MAY_CHANGE_ON_RESUME)
    for key in sorted(keys):
        old, new = checkpoint.run_config.get(key), run_config.get(key)
        if old != new:
            raise ConfigError(
                key,
                new,
                f"{old!r}, as in the run being resumed (or resume = false)",
                str(source / CHECKPOINT_FILE),
            )
