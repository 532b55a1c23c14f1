"""A client's personal factors (the train instruction's ``personal`` parts, FedSA-LoRA's B):
kept on the client across rounds, never sent to the server.

Each round a client trains them, it writes their values to
``<root>/<personal-key>/client-<id>/round-<t>.npz``; the next time it trains (or evaluates) it
starts from the newest values of an earlier round (of round t itself when it evaluates round
t's model). A round's file is written whole and then renamed, so a killed client never leaves
half a file, and a resumed run, which repeats the round it was killed in, starts from what the
client had after the last round the server finished. The two newest files are kept: the newest
one before the round a resume repeats is always among them.

``root`` is the node config's ``state-dir`` (a deployed device's own folder), else
``<results-dir>/client-state`` (simulation: the run's results folder). The personal key names
the run and survives its resume, so a new run never starts from an old run's values.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client_apps.node_config import NODE_STATE_DIR
from hetfed.adapter_state import State, factor_of

_ROUND_FILE = re.compile(r"round-(\d+)\.npz")
_KEPT = 2


@dataclass(frozen=True)
class PersonalStore:
    """One client's personal values of one run, by round."""

    folder: Path

    @classmethod
    def of(cls, results_dir: str, node_config: dict, key: str, client_id: int) -> PersonalStore:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"personal-key {key!r}: allowed are letters, digits, '_' and '-'")
        root = Path(str(node_config.get(NODE_STATE_DIR, Path(results_dir) / "client-state")))
        return cls(root / key / f"client-{client_id}")

    def rounds(self) -> list[int]:
        """The rounds whose values are kept, oldest first."""
        if not self.folder.is_dir():
            return []
        found = (_ROUND_FILE.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self, through_round: int) -> State:
        """The newest values of a round <= ``through_round`` (empty: none yet)."""
        earlier = [t for t in self.rounds() if t <= through_round]
        if not earlier:
            return {}
        with np.load(self._path(earlier[-1])) as arrays:
            return {key: arrays[key] for key in arrays.files}

    def save(self, server_round: int, state: State) -> None:
        """Keep the values trained in ``server_round``; older rounds beyond the two newest go."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".round-{server_round}.{os.getpid()}.npz"
        np.savez(partial, **state)
        partial.replace(self._path(server_round))
        for old in self.rounds()[:-_KEPT]:
            self._path(old).unlink(missing_ok=True)

    def _path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:05d}.npz"


def split_personal(state: State, personal: tuple[str, ...]) -> tuple[State, State]:
    """(what the client returns, its personal factors) of a trained state."""
    kept = {k: v for k, v in state.items() if factor_of(k) in personal}
    return {k: v for k, v in state.items() if k not in kept}, kept
