"""``hetfed costs``: what each rank and each layer budget costs a client of a scenario's model.

For the scenario's model, local steps, batch and sequence length (:mod:`hetfed.cost_model`):
training FLOPs of one round, peak training memory, and the bytes of the adapter down (every
block) and up (the trained blocks), as a Markdown table. A layer budget of K blocks is costed
twice: with the lowest K blocks trained (the worst placement, as derived budgets are: the
backward pass and its activations reach down to block 0) and with the top K (the best).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hetfed.cost_model import adapter_bytes, peak_memory_bytes, step_cost
from tooling.scenarios import check

GB, MB = 2**30, 1e6


def costs_table(
    scenario: str | Path, ranks: Sequence[int], layer_counts: Sequence[int] | None = None
) -> str:
    """The table: one row per rank at every block, then one per block count at the largest
    rank (both placements)."""
    plan = check(scenario, [])
    clock, shape = plan.clock, plan.clock.shape
    blocks, work = shape.blocks, plan.clock.work
    counts = layer_counts or sorted({blocks * 3 // 4, blocks // 2, blocks // 4, 1} - {0})
    rows = [(rank, blocks) for rank in ranks] + [(max(ranks), k) for k in counts if k < blocks]
    lines = [
        f"{plan.settings.model.name}: {work.steps} local steps of {work.batch} x {work.tokens} "
        f"tokens, LoRA on {', '.join(work.target_modules)}, frozen weights "
        f"{shape.frozen_parameters * 4 / GB:.2f} GB (float32)",
        "",
        "| rank | blocks trained | GFLOPs a round | peak memory GB | MB down | MB up |",
        "|---|---|---|---|---|---|",
    ]
    for rank, count in rows:
        placements = [tuple(range(count)), tuple(range(blocks - count, blocks))]
        flops, memory = [], []
        for placement in placements[: 1 if count == blocks else 2]:
            update = clock.update(rank, placement)
            flops.append(f"{work.steps * step_cost(shape, update).flops / 1e9:.1f}")
            memory.append(f"{peak_memory_bytes(shape, update) / GB:.3f}")
        down = adapter_bytes(shape, rank, work.target_modules, blocks)
        up = adapter_bytes(shape, rank, work.target_modules, count)
        which = f"{count} of {blocks}" + (" (lowest / top)" if count < blocks else "")
        lines.append(
            f"| {rank} | {which} | {' / '.join(flops)} | {' / '.join(memory)} | "
            f"{down / MB:.3f} | {up / MB:.3f} |"
        )
    return "\n".join(lines)
