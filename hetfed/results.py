"""Results a user can read and plot: metrics.jsonl per round, summary.json, accuracy.png."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``metrics.jsonl``; round 0 is the initial global model."""

    round: int
    accuracy: float
    loss: float
    sampled: int
    replied: int
    failed: int  # sampled - replied: errors, timeouts and rejected replies
    rejected: int  # replies that arrived but failed validation
    attempts: int  # 1, or more when a round with too few valid replies was retried
    skipped: bool  # no attempt had min-train-replies valid replies: the global was kept
    bytes_down: int
    bytes_up: int
    train_loss: float | None
    seconds: float
    # configure_train start to aggregate_train end, over all attempts (0 in round 0; None in
    # records of runs from before it was measured)
    train_seconds: float | None = None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ResultsWriter:
    """Writes a run's results folder as the run goes, so a killed run leaves readable files.

    ``records`` are the rounds a resumed run already has (from its checkpoint).
    """

    def __init__(self, folder: str | Path, records: list[RoundRecord] | None = None) -> None:
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.folder / "metrics.jsonl"
        self.records: list[RoundRecord] = list(records or [])
        lines = "".join(json.dumps(asdict(r)) + "\n" for r in self.records)
        self.metrics_path.write_text(lines, encoding="utf-8")

    def add_round(self, record: RoundRecord) -> None:
        self.records.append(record)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.folder / "summary.json", json.dumps(summary, indent=2) + "\n")

    def plot(self, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r.round for r in self.records]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, [r.accuracy for r in self.records], marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel("central test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        path = self.folder / "accuracy.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """The per-round records of a results folder."""
    lines = (Path(folder) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summary_table(folders: list[str | Path]) -> str:
    """A Markdown table comparing finished runs (one row per results folder)."""
    rows = [
        "| run | strategy | final acc. | best acc. | MB down | MB up | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for folder in folders:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            rows.append(
                f"| {Path(folder).name} | (no summary.json: failed or unfinished) | | | | | |"
            )
            continue
        s = json.loads(path.read_text(encoding="utf-8"))
        rows.append(
            f"| {Path(folder).name} | {s['strategy'].split(':')[0]} | {s['final_accuracy']:.4f} "
            f"| {s['best_accuracy']:.4f} | {s['bytes_down'] / 1e6:.1f} | {s['bytes_up'] / 1e6:.1f}"
            f" | {s['seconds']:.0f} |"
        )
    return "\n".join(rows)
