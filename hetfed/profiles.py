"""Device profiles: named tiers with a LoRA budget, and how tiers are assigned to clients.

A profile file (YAML)::

    tiers:                                   # rank: LoRA rank; layers (optional): how many
                                             # transformer blocks carry trainable LoRA, as a
                                             # count K or a fraction of the model's blocks
      phone:       {rank: 2, layers: 2, memory-gb: 4, compute-gflops: 50, bandwidth-mbps: 10}
      laptop:      {rank: auto, layers: 0.5, memory-gb: 16, compute-gflops: 400}
      workstation: {rank: 8, memory-gb: 64, compute-gflops: 4000, bandwidth-mbps: 500,
                    latency-ms: 20}
    assignment:
      ratios: {phone: 5, laptop: 3, workstation: 2}   # or
      # by-partition: [phone, phone, laptop, ...]     # one tier per partition id
    auto: {max-rank: 64, memory-reserve-gb: 0.5}      # optional: how auto budgets are derived

``memory-gb``, ``compute-gflops``, ``bandwidth-mbps`` and ``latency-ms`` drive the simulated
device clock (:mod:`hetfed.device_clock`). ``rank: auto`` and ``layers: auto`` are derived for
the run's model (:mod:`hetfed.budgets`): the largest that fit ``memory-gb`` less the reserve,
and the round deadline. In simulation a client derives its tier from its partition id; in
deployment a SuperNode names its tier in ``--node-config "tier='phone'"``, which wins over the
assignment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hetfed.errors import ConfigError

AUTO = "auto"  # a rank or layer budget derived from the device (hetfed.budgets)
TIER_KEYS = {
    "rank": (int, str),
    "layers": (int, float, str),
    "memory-gb": (int, float),
    "compute-gflops": (int, float),
    "bandwidth-mbps": (int, float),
    "latency-ms": (int, float),
    "description": str,
}
ASSIGNMENT_KEYS = ("ratios", "by-partition")
# keys of the optional top-level "auto" mapping: (type, DeviceProfiles field)
AUTO_KEYS = {
    "max-rank": (int, "max_auto_rank"),
    "memory-reserve-gb": ((int, float), "memory_reserve_gb"),
}


@dataclass(frozen=True)
class Tier:
    """One class of device and the LoRA budget it can afford."""

    name: str
    rank: int | str  # or "auto" until derived (hetfed.budgets)
    layers: int | float | str | None = None  # a count K, a fraction of the blocks, "auto", all
    memory_gb: float | None = None
    compute_gflops: float | None = None
    bandwidth_mbps: float | None = None
    latency_ms: float = 0.0
    description: str = ""

    def layer_budget(self, num_layers: int) -> int:
        """How many of the model's ``num_layers`` transformer blocks this tier trains LoRA in."""
        if self.layers is None or self.layers == AUTO:
            return num_layers
        if isinstance(self.layers, float):
            return max(1, round(self.layers * num_layers))
        return self.layers


@dataclass(frozen=True)
class DeviceProfiles:
    """Tiers by name plus the rule that assigns a tier to each simulated partition."""

    tiers: dict[str, Tier]
    ratios: dict[str, int] = field(default_factory=dict)
    by_partition: tuple[str, ...] = ()
    source: str = "profiles"
    text: str = ""
    max_auto_rank: int = 64  # auto: the largest rank derived
    memory_reserve_gb: float = 0.5  # auto: memory the device keeps for everything else

    @property
    def auto(self) -> list[Tier]:
        """The tiers whose rank or layer budget is derived (hetfed.budgets)."""
        return [t for t in self.tiers.values() if AUTO in (t.rank, t.layers)]

    def tier(self, name: str, key: str = "tier") -> Tier:
        if name not in self.tiers:
            raise ConfigError(key, name, f"a tier of {self.source}: {', '.join(self.tiers)}")
        return self.tiers[name]

    def tier_for_partition(self, partition_id: int, num_partitions: int) -> Tier:
        """The tier of a simulated client; ratios give contiguous blocks in the listed order."""
        if not 0 <= partition_id < num_partitions:
            raise ConfigError("partition-id", partition_id, f"an integer in [0, {num_partitions})")
        if self.by_partition:
            if len(self.by_partition) != num_partitions:
                raise ConfigError(
                    "assignment.by-partition",
                    list(self.by_partition),
                    f"one tier per partition ({num_partitions} entries)",
                    self.source,
                )
            return self.tiers[self.by_partition[partition_id]]
        counts = ratio_counts(self.ratios, num_partitions)
        boundary = 0
        for name, count in counts.items():
            boundary += count
            if partition_id < boundary:
                return self.tiers[name]
        raise AssertionError("ratio_counts covers every partition")

    @property
    def max_rank(self) -> int:
        return max(t.rank for t in self.tiers.values())

    @property
    def min_rank(self) -> int:
        return min(t.rank for t in self.tiers.values())


def ratio_counts(ratios: Mapping[str, int], total: int) -> dict[str, int]:
    """Split ``total`` clients by ``ratios`` with the largest-remainder method (sums exactly)."""
    weight = sum(ratios.values())
    exact = {name: total * r / weight for name, r in ratios.items()}
    counts = {name: int(v) for name, v in exact.items()}
    by_remainder = sorted(ratios, key=lambda n: exact[n] - counts[n], reverse=True)
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def _check_type(value: Any, types: Any, key: str, source: str, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigError(key, value, allowed, source)


def parse_profiles(text: str, source: str = "profiles") -> DeviceProfiles:
    """Parse and validate a profile document; errors name the file, the key and the value."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError("<document>", "unparsable YAML", f"valid YAML ({err})", source) from err
    if not isinstance(doc, dict) or not isinstance(doc.get("tiers"), dict) or not doc["tiers"]:
        raise ConfigError(
            "tiers",
            None if not isinstance(doc, dict) else doc.get("tiers"),
            "a mapping of tier names to {rank: ...}",
            source,
        )
    for key in doc:
        if key not in ("tiers", "assignment", AUTO):
            raise ConfigError(str(key), doc[key], "top-level keys tiers, assignment, auto", source)
    auto = doc.get(AUTO) or {}
    if not isinstance(auto, dict):
        raise ConfigError(AUTO, auto, f"a mapping with keys {', '.join(AUTO_KEYS)}", source)
    for key, value in auto.items():
        if key not in AUTO_KEYS:
            raise ConfigError(f"auto.{key}", value, f"keys {', '.join(AUTO_KEYS)}", source)
        _check_type(value, AUTO_KEYS[key][0], f"auto.{key}", source, "a number > 0")
        if value <= 0:
            raise ConfigError(f"auto.{key}", value, "a number > 0", source)
    tiers = {}
    for name, spec in doc["tiers"].items():
        prefix = f"tiers.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(prefix, spec, "a mapping with at least 'rank'", source)
        for key, value in spec.items():
            if key not in TIER_KEYS:
                raise ConfigError(f"{prefix}.{key}", value, f"keys {', '.join(TIER_KEYS)}", source)
            _check_type(
                value,
                TIER_KEYS[key],
                f"{prefix}.{key}",
                source,
                "a string" if TIER_KEYS[key] is str else "a number",
            )
        rank = spec.get("rank")
        if rank != AUTO and (not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"{prefix}.rank", rank, "an integer >= 1 or 'auto'", source)
        layers = spec.get("layers")
        if (
            isinstance(layers, str)
            and layers != AUTO
            or isinstance(layers, int)
            and layers < 1
            or isinstance(layers, float)
            and not (0 < layers <= 1)
        ):
            raise ConfigError(
                f"{prefix}.layers",
                layers,
                "a layer count >= 1, a fraction of the model's layers in (0, 1], or 'auto'",
                source,
            )
        if AUTO in (rank, layers) and "memory-gb" not in spec:
            raise ConfigError(f"{prefix}.memory-gb", None, "a number (auto budgets)", source)
        tiers[str(name)] = Tier(
            name=str(name),
            rank=spec["rank"],
            layers=layers,
            memory_gb=spec.get("memory-gb"),
            compute_gflops=spec.get("compute-gflops"),
            bandwidth_mbps=spec.get("bandwidth-mbps"),
            latency_ms=spec.get("latency-ms", 0.0),
            description=spec.get("description", ""),
        )
    ratios, by_partition = _parse_assignment(doc.get("assignment"), tiers, source)
    limits = {AUTO_KEYS[key][1]: value for key, value in auto.items()}
    return DeviceProfiles(tiers, ratios, by_partition, source, text, **limits)


def _parse_assignment(
    assignment: Any, tiers: dict[str, Tier], source: str
) -> tuple[dict[str, int], tuple[str, ...]]:
    if assignment is None:  # equal shares of every tier
        return {name: 1 for name in tiers}, ()
    if (
        not isinstance(assignment, dict)
        or len(assignment) != 1
        or next(iter(assignment)) not in ASSIGNMENT_KEYS
    ):
        raise ConfigError(
            "assignment",
            assignment,
            "a mapping with exactly one of 'ratios' or 'by-partition'",
            source,
        )
    known = ", ".join(tiers)
    if "ratios" in assignment:
        ratios = assignment["ratios"]
        if not isinstance(ratios, dict) or not ratios:
            raise ConfigError(
                "assignment.ratios", ratios, "a mapping of tier name to count", source
            )
        for name, count in ratios.items():
            if name not in tiers:
                raise ConfigError(f"assignment.ratios.{name}", count, f"a tier: {known}", source)
            _check_type(count, int, f"assignment.ratios.{name}", source, "an integer >= 1")
            if count < 1:
                raise ConfigError(f"assignment.ratios.{name}", count, "an integer >= 1", source)
        return {str(k): v for k, v in ratios.items()}, ()
    listed = assignment["by-partition"]
    if not isinstance(listed, list) or not listed:
        raise ConfigError("assignment.by-partition", listed, "a list of tier names", source)
    for index, name in enumerate(listed):
        if name not in tiers:
            raise ConfigError(f"assignment.by-partition[{index}]", name, f"a tier: {known}", source)
    return {}, tuple(listed)


def with_budgets(profiles: DeviceProfiles, budgets: dict[str, tuple[int, int]]) -> DeviceProfiles:
    """The profiles with the given tiers' ``auto`` budgets replaced by (rank, block count); the
    text (what clients are sent) says the derived values."""
    if not budgets:
        return profiles
    doc = yaml.safe_load(profiles.text)
    for name, (rank, blocks) in budgets.items():
        spec = doc["tiers"][name]
        spec["rank"] = rank if spec["rank"] == AUTO else spec["rank"]
        if spec.get("layers") == AUTO:
            spec["layers"] = blocks
    return parse_profiles(yaml.safe_dump(doc, sort_keys=False), profiles.source)


def load_profiles(path: str | Path) -> DeviceProfiles:
    """Read a profile file; a missing file is reported with the key that named it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("profiles", str(path), "an existing YAML file of device profiles")
    return parse_profiles(path.read_text(encoding="utf-8"), source=str(path))


def available_memory_gb() -> float:
    """Free memory of this device (Linux MemAvailable, else the OS's available pages)."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
