"""A simulated device clock: how long a client's update takes on its tier's device, and what a
round deadline lets it do.

A client's time is

    compute (its training FLOPs / (the tier's compute-gflops x 1e9 x compute-efficiency))
    + communication ((bytes down + bytes up) x 8 / (the tier's bandwidth-mbps x 1e6))
    + latency (the tier's latency-ms, once per round trip),

with the FLOPs from :mod:`hetfed.cost_model` and the bytes of the actual messages.
``compute-efficiency`` is the share of a device's peak compute that training sustains [choice:
0.5 by default; measure your devices]. A round takes as long as its slowest participant, or the
whole ``round-deadline`` when a client was dropped for missing it (the server waits until the
deadline to know). With a deadline (``round-deadline`` > 0) a client whose time would exceed it
is a straggler: ``straggler-policy = "drop"`` leaves it out of the round (it is not sent
anything: its update would be discarded), ``"partial"`` lets it train as many local steps as fit
(at least one, else it is dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from hetfed.cost_model import ModelShape, UpdateShape, step_cost
from hetfed.profiles import Tier


@dataclass(frozen=True)
class ClientTime:
    """A client's simulated seconds, by part."""

    compute: float
    communication: float
    latency: float

    @property
    def total(self) -> float:
        return self.compute + self.communication + self.latency


def compute_seconds(tier: Tier, flops: float, efficiency: float) -> float:
    return flops / (tier.compute_gflops * 1e9 * efficiency) if tier.compute_gflops else 0.0


def communication_seconds(tier: Tier, bytes_moved: float) -> float:
    return bytes_moved * 8 / (tier.bandwidth_mbps * 1e6) if tier.bandwidth_mbps else 0.0


def client_time(
    tier: Tier, flops: float, bytes_down: float, bytes_up: float, efficiency: float
) -> ClientTime:
    """A client's simulated seconds on its tier's device (a tier without a speed costs nothing
    on that part)."""
    return ClientTime(
        compute_seconds(tier, flops, efficiency),
        communication_seconds(tier, bytes_down + bytes_up),
        tier.latency_ms / 1000,
    )


@dataclass(frozen=True)
class ClientPlan:
    """What a client does this round under the deadline: its local steps (0: dropped as a
    straggler) and its simulated time."""

    steps: int
    time: ClientTime


class DeviceClock:
    """The clock of one run: the model's shape, the local work, the deadline and its policy."""

    def __init__(
        self,
        shape: ModelShape,
        work: UpdateShape,
        efficiency: float,
        deadline: float = 0.0,
        policy: str = "drop",
    ) -> None:
        self.shape, self.work = shape, work  # work: the run's steps, batch, tokens, modules
        self.efficiency, self.deadline, self.policy = efficiency, deadline, policy

    def update(self, rank: int, blocks: tuple[int, ...], steps: int | None = None) -> UpdateShape:
        return replace(self.work, rank=rank, trained_blocks=blocks, steps=steps or self.work.steps)

    def plan(
        self, tier: Tier, rank: int, blocks: tuple[int, ...], bytes_down: float, bytes_up: float
    ) -> ClientPlan:
        """The client's steps and time: all its local steps, unless the deadline cuts them."""
        per_step = step_cost(self.shape, self.update(rank, blocks, 1)).flops
        steps = self.work.steps
        time = client_time(tier, per_step * steps, bytes_down, bytes_up, self.efficiency)
        if self.deadline <= 0 or time.total <= self.deadline:
            return ClientPlan(steps, time)
        if self.policy == "partial":
            fixed = time.communication + time.latency
            step_seconds = compute_seconds(tier, per_step, self.efficiency)
            steps = math.floor((self.deadline - fixed) / step_seconds) if step_seconds else 0
            if steps >= 1:
                flops = per_step * steps
                return ClientPlan(
                    steps, client_time(tier, flops, bytes_down, bytes_up, self.efficiency)
                )
        return ClientPlan(0, time)

    def round_seconds(self, plans: list[ClientPlan]) -> float:
        """The slowest participant's time, or the deadline when a straggler was dropped."""
        slowest = max((p.time.total for p in plans if p.steps), default=0.0)
        dropped = any(not p.steps for p in plans)
        return max(slowest, self.deadline) if dropped else slowest
