"""The simulated device clock, round deadlines and budgets derived from a device's memory, on
hand-made profiles (hetfed.device_clock, hetfed.budgets, the strategy base)."""

from __future__ import annotations

import numpy as np
import pytest

from hetfed import wire
from hetfed.budgets import derive_budgets
from hetfed.config import RunSettings
from hetfed.cost_model import UpdateShape, peak_memory_bytes, step_cost
from hetfed.device_clock import DeviceClock, client_time
from hetfed.errors import ConfigError
from hetfed.models import ModelConfig, cost_shape
from hetfed.profiles import parse_profiles
from strategies.zeropad import ZeroPad
from tests.harness import InProcessGrid, global_state, train_round, trained

TINY = cost_shape(ModelConfig(name="tiny-random-bert"), 3)
WORK = UpdateShape(1, ("query", "value"), (), steps=10, batch=16, tokens=32)
# Three devices: slow compute, slow network, fast; ranks 2, 4, 8 as the harness's s, m, l.
PROFILES = parse_profiles(
    """
tiers:
  s: {rank: 2, compute-gflops: 0.1, bandwidth-mbps: 100, latency-ms: 50}
  m: {rank: 4, compute-gflops: 100, bandwidth-mbps: 0.0001}
  l: {rank: 8, compute-gflops: 100, bandwidth-mbps: 100}
assignment: {by-partition: [s, m, l]}
"""
)


def test_client_time_is_compute_plus_communication_plus_latency():
    s = PROFILES.tiers["s"]
    time = client_time(s, flops=2e9, bytes_down=1e6, bytes_up=5e5, efficiency=0.5)
    assert time.compute == pytest.approx(2e9 / (0.1e9 * 0.5))
    assert time.communication == pytest.approx(1.5e6 * 8 / 100e6)
    assert time.latency == 0.05 and time.total == pytest.approx(40 + 0.12 + 0.05)


def step_seconds_of(tier, rank):
    """One local step of every block on ``tier``'s device, by the cost model."""
    update = DeviceClock(TINY, WORK, 0.5).update(rank, tuple(range(TINY.blocks)), 1)
    return step_cost(TINY, update).flops / (tier.compute_gflops * 1e9 * 0.5)


def test_deadline_drops_or_cuts_the_steps_of_a_straggler():
    s, blocks = PROFILES.tiers["s"], tuple(range(TINY.blocks))
    step_seconds = step_seconds_of(s, 1)
    deadline = 0.05 + 3.5 * step_seconds  # room for 3 steps after the latency
    drop = DeviceClock(TINY, WORK, 0.5, deadline, "drop")
    partial = DeviceClock(TINY, WORK, 0.5, deadline, "partial")
    full = drop.plan(s, 1, blocks, 0, 0)
    assert full.steps == 0 and full.time.total == pytest.approx(0.05 + 10 * step_seconds)
    cut = partial.plan(s, 1, blocks, 0, 0)
    assert cut.steps == 3 and cut.time.total == pytest.approx(0.05 + 3 * step_seconds)
    too_slow = DeviceClock(TINY, WORK, 0.5, 0.05 + 0.5 * step_seconds, "partial")
    assert too_slow.plan(s, 1, blocks, 0, 0).steps == 0  # not even one step fits
    no_deadline = DeviceClock(TINY, WORK, 0.5)
    assert no_deadline.plan(s, 1, blocks, 0, 0).steps == 10
    # the round waits for its slowest participant, or until the deadline for a dropped one
    assert drop.round_seconds([cut]) == pytest.approx(cut.time.total)
    assert drop.round_seconds([cut, full]) == pytest.approx(deadline)


@pytest.mark.parametrize("policy", ["drop", "partial"])
def test_a_round_leaves_out_or_shortens_the_clients_that_would_miss_the_deadline(policy):
    """Tier s computes too slowly for the deadline, tier m sends too slowly (partial steps do
    not help it): s trains fewer steps under "partial", m is always dropped."""
    deadline = 5.0
    settings = RunSettings(
        min_train_nodes=1, min_available_nodes=3, round_deadline=deadline, straggler_policy=policy
    )
    strategy = ZeroPad(settings, PROFILES)
    strategy.clock = DeviceClock(TINY, WORK, 0.5, deadline, policy)
    rng = np.random.default_rng(0)
    grid = InProcessGrid(profiles=PROFILES)
    grid.train = trained(rng)[0]
    messages, _ = train_round(strategy, global_state(rng), grid.train)
    sent = {m.metadata.dst_node_id: m.content[wire.CONFIG] for m in messages}
    stats = strategy.stats[1]
    if policy == "drop":
        assert set(sent) == {1002} and stats.stragglers == 2
    else:
        assert set(sent) == {1000, 1002} and stats.stragglers == 1
        s = PROFILES.tiers["s"]
        nbytes = wire.nbytes(wire.from_record(messages[0].content[wire.ARRAYS]))
        room = deadline - 0.05 - 2 * nbytes * 8 / (s.bandwidth_mbps * 1e6)
        assert int(sent[1000][wire.LOCAL_STEPS]) == int(room // step_seconds_of(s, 2)) == 5
        assert wire.LOCAL_STEPS not in sent[1002]  # the fast client trains every step
    assert stats.simulated_seconds == pytest.approx(deadline)  # m missed it: a full wait
    assert stats.sampled == len(sent) and stats.replied == len(sent)


def test_rank_auto_is_the_largest_rank_that_fits_and_a_tier_that_fits_nothing_is_refused():
    clock = DeviceClock(TINY, WORK, 0.5)

    def memory(rank):
        return peak_memory_bytes(TINY, clock.update(rank, tuple(range(TINY.blocks))))

    reserve = 0.5
    gb = (reserve * 2**30 + (memory(5) + memory(6)) / 2) / 2**30  # rank 5 fits, 6 does not
    profiles = parse_profiles(
        f"tiers: {{small: {{rank: auto, memory-gb: {gb}}}, big: {{rank: 3, memory-gb: 8}}}}\n"
        f"auto: {{max-rank: 16, memory-reserve-gb: {reserve}}}"
    )
    derived, budgets = derive_budgets(profiles, clock, rank_limit=32, head_bytes=0)
    assert derived.tiers["small"].rank == 5 and derived.tiers["big"].rank == 3
    assert parse_profiles(derived.text).tiers["small"].rank == 5  # what clients are sent
    assert [b.rank for b in budgets] == [5, 3]
    tiny_device = parse_profiles(
        f"tiers: {{watch: {{rank: auto, layers: auto, memory-gb: {reserve + 1e-6}}}}}"
    )
    with pytest.raises(ConfigError, match="rank 1 in 1 block") as err:
        derive_budgets(tiny_device, clock, rank_limit=32, head_bytes=0)
    assert err.value.key == "tiers.watch" and "GB of memory" in str(err.value)


def test_a_device_with_tier_auto_picks_the_largest_update_its_free_memory_holds(monkeypatch):
    from client_apps import lora_client

    profiles = parse_profiles(
        "tiers: {s: {rank: 2, memory-gb: 2}, m: {rank: 4, memory-gb: 8},"
        " l: {rank: 8, memory-gb: 64}}\nauto: {memory-reserve-gb: 1}"
    )
    needs = [0.5, 3.0, 20.0]  # GB each tier's update needs, as the server computes them
    for free, expected in ((1.2, "s"), (4.5, "m"), (100.0, "l"), (0.1, "s")):
        monkeypatch.setattr(lora_client, "available_memory_gb", lambda free=free: free)
        assert lora_client.node_tier({"tier": "auto"}, profiles, needs).name == expected
