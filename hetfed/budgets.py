"""Budgets from the device: the rank and block count a tier affords for the run's model.

A tier with ``rank: auto`` and/or ``layers: auto`` gets the largest block count, then the
largest rank (at most the profiles' ``auto.max-rank`` and the model's limit), whose peak training
memory (:func:`hetfed.cost_model.peak_memory_bytes`) fits the tier's ``memory-gb`` less
``auto.memory-reserve-gb`` (what the device keeps for everything else, 0.5 GB by default), and,
with a ``round-deadline``, whose full local training and messages fit it on the device's clock
(:mod:`hetfed.device_clock`). A layer method chooses which blocks a client trains, so K blocks
are costed with the lowest block among them (the worst placement): activations are kept from
the lowest trained block up. A tier that cannot train the model at rank 1 in one block is a
:class:`ConfigError` naming the tier and what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetfed.cost_model import adapter_bytes, peak_memory_bytes
from hetfed.device_clock import DeviceClock
from hetfed.errors import ConfigError
from hetfed.profiles import AUTO, DeviceProfiles, Tier, with_budgets

GB = 2**30


@dataclass(frozen=True)
class Budget:
    """What a tier affords: its rank and blocks, and what they cost."""

    tier: str
    rank: int
    blocks: int
    memory_bytes: float
    seconds: float  # the simulated time of a full update (0 without device speeds)

    def describe(self, num_blocks: int, memory_gb: float | None) -> str:
        memory = f"{memory_gb:g} GB" if memory_gb is not None else "memory not given"
        time = f", {self.seconds:.1f} s a round" if self.seconds else ""
        over = ", more than memory-gb" if memory_gb and self.memory_bytes > memory_gb * GB else ""
        return (
            f"{self.tier} {memory} -> rank {self.rank}, {self.blocks} of {num_blocks} blocks "
            f"(needs {self.memory_bytes / GB:.2f} GB{time}{over})"
        )


def budget_cost(
    clock: DeviceClock, tier: Tier, rank: int, blocks: int, head_bytes: float
) -> tuple[float, float]:
    """(peak training bytes, simulated seconds) of a rank-``rank`` update of ``blocks`` blocks
    (the lowest ones: the worst placement), its messages the full adapter down and the trained
    blocks up."""
    shape, work = clock.shape, clock.work
    placement = tuple(range(blocks))
    memory = peak_memory_bytes(shape, clock.update(rank, placement))
    down = adapter_bytes(shape, rank, work.target_modules, shape.blocks) + head_bytes
    up = adapter_bytes(shape, rank, work.target_modules, blocks) + head_bytes
    seconds = clock.plan(tier, rank, placement, down, up).time.total
    return memory, seconds


def affordable(
    tier: Tier, profiles: DeviceProfiles, clock: DeviceClock, rank_limit: int, head_bytes: float
) -> Budget:
    """The budget of one tier: its own rank and layers, or the largest that fit (see the
    module); a tier that fits nothing is a ConfigError."""
    num_blocks = clock.shape.blocks
    all_blocks = range(num_blocks, 0, -1)
    block_counts = all_blocks if tier.layers == AUTO else [tier.layer_budget(num_blocks)]
    top = min(profiles.max_auto_rank, rank_limit)
    ranks = range(top, 0, -1) if tier.rank == AUTO else [tier.rank]
    memory = (tier.memory_gb - profiles.memory_reserve_gb) * GB if tier.memory_gb else None
    for blocks in block_counts:
        for rank in ranks:
            need, seconds = budget_cost(clock, tier, rank, blocks, head_bytes)
            fits_memory = memory is None or need <= memory
            fits_time = clock.deadline <= 0 or seconds <= clock.deadline
            if fits_memory and fits_time:
                return Budget(tier.name, rank, blocks, need, seconds)
    need, seconds = budget_cost(clock, tier, min(ranks), min(block_counts), head_bytes)
    lacks = []
    if memory is not None and need > memory:
        lacks.append(
            f"{need / GB:.2f} GB of memory, it has {tier.memory_gb:g} GB less the "
            f"{profiles.memory_reserve_gb:g} GB reserve"
        )
    if clock.deadline > 0 and seconds > clock.deadline:
        lacks.append(f"{seconds:.1f} s, the round deadline is {clock.deadline:g} s")
    raise ConfigError(
        f"tiers.{tier.name}",
        f"memory-gb {tier.memory_gb}",
        f"a device that can train the model at rank {min(ranks)} in {min(block_counts)} "
        f"block(s): that needs {' and '.join(lacks)}",
        profiles.source,
    )


def required_memory_gb(profiles: DeviceProfiles, clock: DeviceClock) -> list[float]:
    """GB each tier's update needs (its rank and blocks, the worst placement), in tier order:
    what a device with ``tier='auto'`` compares its measured free memory with."""
    needs = []
    for tier in profiles.tiers.values():
        blocks = tier.layer_budget(clock.shape.blocks)
        needs.append(
            peak_memory_bytes(clock.shape, clock.update(tier.rank, tuple(range(blocks)))) / GB
        )
    return needs


def derive_budgets(
    profiles: DeviceProfiles, clock: DeviceClock, rank_limit: int, head_bytes: float
) -> tuple[DeviceProfiles, list[Budget]]:
    """The profiles with every ``auto`` rank and layer budget replaced by what its tier
    affords, and every tier's budget with its cost (a tier's own budget is costed as given:
    ``memory-gb`` binds only what is derived)."""
    budgets = []
    for tier in profiles.tiers.values():
        if tier in profiles.auto:
            budgets.append(affordable(tier, profiles, clock, rank_limit, head_bytes))
        else:
            blocks = tier.layer_budget(clock.shape.blocks)
            memory, seconds = budget_cost(clock, tier, tier.rank, blocks, head_bytes)
            budgets.append(Budget(tier.name, tier.rank, blocks, memory, seconds))
    derived = {
        b.tier: (b.rank, b.blocks) for b in budgets if profiles.tiers[b.tier] in profiles.auto
    }
    return with_budgets(profiles, derived), budgets
