"""Every budget rule in one place: what a tier affords, which tier a device is, what a device
accepts (the ServerApp, the ClientApp and ``hetfed check`` all ask here).

- Before the run: :func:`derive_budgets` (below), :func:`check_deadline_speeds`,
  :func:`check_affordable_ranks`.
- A device with ``tier='auto'``: :func:`tier_from_memory`, given what each tier's update needs
  (:func:`required_memory_gb`, which the server sends with its budget query).
- A device's answers: :func:`reported_rank_problem` (the server checks a budget reply) and
  :func:`check_sent_rank` (a device refuses a rank above its budget).

What a tier affords for the run's model:

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hetfed.cost_model import UpdateShape, adapter_bytes, peak_memory_bytes
from hetfed.device_clock import DeviceClock
from hetfed.errors import ConfigError
from hetfed.profiles import AUTO, DeviceProfiles, Tier, with_budgets

if TYPE_CHECKING:  # the settings type only: a budget query must not import PyTorch
    from hetfed.config import RunSettings

GB = 2**30


def local_update(
    settings: RunSettings, rank: int, blocks: tuple[int, ...], scored: int, steps: int = 0
) -> UpdateShape:
    """One client's local update in this run, for the cost model: ``rank`` on the targeted
    modules of ``blocks``, ``steps`` local steps (0: train.local-steps) of the run's batch and
    sequence length, ``scored`` positions a step computes the loss on."""
    return UpdateShape(
        rank=rank,
        target_modules=settings.lora.modules(),
        trained_blocks=blocks,
        steps=steps or settings.train.local_steps,
        batch=settings.train.batch_size,
        tokens=settings.model.max_length,
        scored=scored,
    )


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


def tier_from_memory(
    profiles: DeviceProfiles, available_gb: float, needs_gb: list[float] | None = None
) -> Tier:
    """The tier of a device with ``available_gb`` of free memory (``tier='auto'``): the tier
    with the largest need that fits that memory less the profiles' reserve, else the one with
    the smallest need. A tier's need is what its update needs (``needs_gb``, in tier order, from
    :func:`required_memory_gb`) or, when the server did not say, its ``memory-gb`` less the
    reserve (what a device of that tier can use)."""
    reserve = profiles.memory_reserve_gb
    if needs_gb is not None:
        needs = dict(zip(profiles.tiers.values(), needs_gb, strict=True))
    else:
        needs = {t: t.memory_gb - reserve for t in profiles.tiers.values() if t.memory_gb}
        if not needs:
            raise ConfigError(
                "node-config tier",
                "auto",
                f"a tier name, or tiers with memory-gb in {profiles.source}",
            )
    fitting = [t for t, need in needs.items() if need <= available_gb - reserve]
    return max(fitting or [min(needs, key=needs.get)], key=needs.get)


def check_deadline_speeds(round_deadline: float, profiles: DeviceProfiles) -> None:
    """A round deadline needs every tier's speed: its compute and its bandwidth."""
    if round_deadline <= 0:
        return
    for tier in profiles.tiers.values():
        for key, value in (
            ("compute-gflops", tier.compute_gflops),
            ("bandwidth-mbps", tier.bandwidth_mbps),
        ):
            if value is None:
                raise ConfigError(
                    f"tiers.{tier.name}.{key}",
                    None,
                    f"a number > 0: round-deadline {round_deadline} needs every tier's speed",
                    profiles.source,
                )


def check_affordable_ranks(
    client_rank: Callable[[int, int], int], profiles: DeviceProfiles, key: str
) -> None:
    """Every tier is sent a rank within its budget (a device refuses a larger one):
    ``client_rank(client id, budget rank)`` is the strategy's rank policy."""
    for client_id, tier in enumerate(profiles.tiers.values()):  # one stand-in client per tier
        rank = client_rank(client_id, tier.rank)
        if rank > tier.rank:
            raise ConfigError(
                key,
                rank,
                f"a rank of at most {tier.rank}: tier {tier.name} affords rank {tier.rank} and its "
                "devices refuse more (for a reference in which every device affords a rank R, "
                "use profiles whose tiers all have rank >= R)",
            )


def reported_rank_problem(tier: Tier, rank: int) -> str | None:
    """Why a device's reported budget rank cannot be its tier's (None: it can): a budget is a
    rank in [1, the tier's rank]."""
    if not 1 <= rank <= tier.rank:
        return f"rank {rank!r} outside [1, {tier.rank}]"
    return None


def check_sent_rank(rank: int, budget_rank: int) -> None:
    """A device refuses to train a rank above its budget."""
    if rank > budget_rank:
        raise ValueError(f"sent rank {rank} exceeds this node's budget {budget_rank}")
