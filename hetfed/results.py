"""Results a user can read and plot: metrics.jsonl per round, summary.json, accuracy.png.

Comparing runs (``hetfed table``, sweeps) is :mod:`tooling.sweep`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hetfed.metrics import CLIENT_TEST_FIGURES, client_distribution, figures_of

TEST_EXAMPLES = "test_examples.jsonl"
PROCESS = "process.json"


@dataclass
class RoundStats:
    """What a strategy counts in one round (over all its attempts); ``metrics.jsonl`` gets it."""

    sampled: int = 0  # messages sent
    replied: int = 0  # valid replies
    failed: int = 0  # sampled - replied: errors, timeouts and rejected replies
    rejected: int = 0  # replies that arrived but failed validation
    attempts: int = 0
    skipped: bool = False  # every attempt had fewer than min-train-replies valid replies
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)  # client id -> rank sent (not written)
    # wall time from the start of configure_train to the end of aggregate_train, all attempts
    train_seconds: float = 0.0
    simulated_seconds: float = 0.0  # on the simulated device clock (hetfed.device_clock)
    stragglers: int = 0  # clients left out: they would have missed the round deadline
    pruned: int = 0  # valid replies at a smaller rank than sent (HetLoRA's self-pruning)
    reply_ranks: list[int] = field(default_factory=list)  # the valid replies' ranks, sorted
    # federated evaluation (fraction-evaluate): each evaluated client's accuracy on its own
    # held-out split of the round (RunSettings.client_split), sorted, and on its local test
    # split where that split is validation and the round one of the last test-rounds
    client_accuracies: list[float] = field(default_factory=list)
    client_test_accuracies: list[float] = field(default_factory=list)

    def record(
        self,
        server_round: int,
        evaluation: Any,
        split: str,
        seconds: float,
        simulated_before: float,
        test: Any = None,
        client_split: str | None = None,
    ) -> RoundRecord:
        """The ``metrics.jsonl`` line of this round, with its central ``evaluation``
        (:class:`hetfed.generation.Evaluation`) on ``split``, the simulated seconds of the
        rounds before and, in the last ``test-rounds`` rounds, the evaluation on ``test``;
        a federated evaluation's figures are on the clients' ``client_split``."""
        lists = ("ranks", "client_accuracies", "client_test_accuracies")
        counters = {k: v for k, v in asdict(self).items() if k not in lists}
        on_test = {"test_accuracy": test.accuracy, "test_loss": test.loss} if test else {}
        on_clients = {}
        if self.client_accuracies:  # a federated evaluation ran this round
            on_clients = {
                "client_split": client_split,
                "client_accuracies": self.client_accuracies,
                **client_distribution(self.client_accuracies),
            }
        if self.client_test_accuracies:
            on_clients |= {
                "client_test_accuracies": self.client_test_accuracies,
                **client_distribution(self.client_test_accuracies, CLIENT_TEST_FIGURES),
            }
        return RoundRecord(
            round=server_round,
            accuracy=evaluation.accuracy,
            loss=evaluation.loss,
            rouge_l=evaluation.rouge_l,
            perplexity=evaluation.perplexity,
            split=split,
            seconds=seconds,
            simulated_total=simulated_before + self.simulated_seconds,
            **on_test,
            **on_clients,
            **counters,
        )


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``metrics.jsonl``; round 0 is the initial global model. Its accuracy, loss,
    ROUGE-L and perplexity are on ``split``: validation when the run has a validation split
    (``data.validation-examples``; the test split is then read for the final model only, in
    ``summary.json``), else test."""

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
    simulated_seconds: float = 0.0  # the round on the simulated device clock
    simulated_total: float = 0.0  # simulated seconds of the run up to this round
    stragglers: int = 0  # clients left out for the round deadline
    rouge_l: float | None = None  # generation: ROUGE-L F1 of greedy generations
    perplexity: float | None = None  # generation: exp(loss per reference target token)
    pruned: int = 0  # valid replies at a smaller rank than sent (HetLoRA's self-pruning)
    reply_ranks: list[int] | None = None  # the valid replies' ranks, sorted
    split: str = "test"  # the split the round's accuracy and loss are on
    # the global model on the test split, in the last test-rounds rounds only (else None)
    test_accuracy: float | None = None
    test_loss: float | None = None
    # federated evaluation (fraction-evaluate): the clients' accuracies on their own held-out
    # splits (client_split: validation when they hold one, else test), and their mean,
    # worst-10% mean and spread (hetfed.metrics.client_distribution)
    client_split: str | None = None
    client_accuracies: list[float] | None = None
    client_accuracy_mean: float | None = None
    client_accuracy_worst10: float | None = None
    client_accuracy_spread: float | None = None
    # the same on their local test splits, where client_split is validation, in the last
    # test-rounds rounds only (else None)
    client_test_accuracies: list[float] | None = None
    client_test_accuracy_mean: float | None = None
    client_test_accuracy_worst10: float | None = None
    client_test_accuracy_spread: float | None = None


def last_rounds_mean(records: Sequence[RoundRecord], rounds: int) -> float | None:
    """The mean test accuracy of the last ``rounds`` rounds' global models (``test-rounds``);
    None when one of them was not scored on test (a run from before they were)."""
    last = [r.test_accuracy for r in records[-rounds:]]
    if len(last) < rounds or any(a is None for a in last):
        return None
    return sum(last) / rounds


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

    def write_generations(self, generations: Sequence[str], references: Sequence[str]) -> None:
        """``generations.jsonl``: each evaluated test example's reference and generation."""
        lines = [
            json.dumps({"index": i, "reference": reference, "generation": generation})
            for i, (generation, reference) in enumerate(zip(generations, references, strict=True))
        ]
        _atomic_write(self.folder / "generations.jsonl", "\n".join(lines) + "\n")

    def write_test_examples(self, rows: Sequence[dict[str, Any]]) -> None:
        """``test_examples.jsonl``: the final model on each test example (right or not, its
        loss; ROUGE-L for generation), for paired comparisons over test examples."""
        _atomic_write(self.folder / TEST_EXAMPLES, "".join(json.dumps(r) + "\n" for r in rows))

    def write_process(self, run_id: int) -> None:
        """``process.json``: the Flower run id and the process (pid, host) that runs the
        ServerApp, so a user or a test can find, stop or kill the process of this run."""
        process = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname()}
        _atomic_write(self.folder / PROCESS, json.dumps(process) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.folder / "summary.json", json.dumps(summary, indent=2) + "\n")

    def plot(self, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r.round for r in self.records]
        fig, ax = plt.subplots(figsize=(6, 4))
        split = self.records[-1].split if self.records else "test"
        last = figures_of(self.records[-1]) if self.records else {}
        plotted = [m for m in last if m.in_unit_interval]  # accuracy, ROUGE-L: one axis
        for metric, marker in zip(plotted, "osd^v", strict=False):
            values = [getattr(r, metric.key) for r in self.records]
            ax.plot(rounds, values, marker=marker, label=f"{split} {metric.label}")
        if len(plotted) > 1:
            ax.legend()
        ax.set_xlabel("round")
        ax.set_ylabel(f"central {split} score")
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
