"""Item 3: time and peak memory (tracemalloc) of every rank strategy's ``aggregate`` on random
client replies of SmolLM2-135M's shapes, side by side with a plain in-place accumulation of the
same replies (:func:`server_aggregation`), and FlexLoRA's factored SVD against the dense sum and
full SVD on one transformer block of 7B-class shapes (:func:`flexlora_large`)."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from hetfed import adapter_state, wire
from hetfed import lora_algebra as la
from hetfed.adapter_state import LoraPairs, State
from hetfed.adapters import LoraSpec
from hetfed.config import parse_run_config
from hetfed.errors import ConfigError
from hetfed.profiles import DeviceProfiles, parse_profiles
from strategies.base import LoRAStrategy
from strategies.layer_base import LayerStrategy
from strategies.registry import load_strategy, strategy_names
from strategies.replies import ClientUpdate
from tooling.bench.common import SimulatedNodes, act_as_flower_task

# (d_out, d_in) of the linear layers of one transformer block (LLaMA names).
SMOLLM2_135M_BLOCK = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
SMOLLM2_135M_LAYERS = 30
LLAMA_7B_BLOCK = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
# Quick mode: the same layouts at 1/24 (SmolLM2) and 1/64 (7B) of the widths.
QUICK_SMOLLM2_BLOCK = {m: (o // 24, i // 24) for m, (o, i) in SMOLLM2_135M_BLOCK.items()}
QUICK_7B_BLOCK = {m: (o // 64, i // 64) for m, (o, i) in LLAMA_7B_BLOCK.items()}
# helora-kd is measured without its server model: FedAvg per rank group, no distillation.
STRATEGY_OVERRIDES = {"helora-kd": {"helora-kd.epochs": 0}}
STRATEGY_NOTES = {"helora-kd": "FedAvg per rank group only: no server model"}
LORA_ALPHA = 16.0
# Item 3a's targets (issue 17): the share of the reference's GB/s a method reaches, or, for
# FlexLoRA, the most its time may be over the time of its own arithmetic.
PERCENT_TARGETS = {
    "zeropad": 50,
    "hetlora": 50,
    "helora-pad": 50,
    "rbla": 50,
    "fedit": 50,
    "flora": 33,
}
ARITHMETIC_TARGETS = {"flexlora": 3.0}


def model_modules(block: dict[str, tuple[int, int]], layers: int) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every LoRA module of a ``layers``-block model (``model.layers.{i}.*``)."""
    return {
        f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in block.items()
    }


def rank_profiles(ranks: Sequence[int]) -> DeviceProfiles:
    """One tier per rank (``r4``, ``r8``, ...), each given an equal share of the clients."""
    lines = [f"  r{rank}: {{rank: {rank}}}" for rank in ranks]
    return parse_profiles("tiers:\n" + "\n".join(lines) + "\n", "rank tiers")


class RandomAdapters:
    """Stands in for the server's :class:`~hetfed.adapters.AdapterHost` where a strategy asks for
    its initial adapter: random float32 factors of the given module shapes, no model."""

    def __init__(self, modules: dict[str, tuple[int, int]]) -> None:
        self.modules = modules

    def initial_state(self, spec: LoraSpec, seed: int) -> State:
        rng = np.random.default_rng(seed)
        state = {}
        for module, (d_out, d_in) in self.modules.items():
            state[f"{module}.lora_A.weight"] = rng.standard_normal((spec.rank, d_in), np.float32)
            state[f"{module}.lora_B.weight"] = rng.standard_normal((d_out, spec.rank), np.float32)
        return state


def rank_strategy(
    name: str,
    modules: dict[str, tuple[int, int]],
    profiles: DeviceProfiles,
    options: dict[str, Any] | None = None,
) -> LoRAStrategy:
    """Registered strategy ``name`` with its default options (or these run-config ``options``),
    bound to random adapters."""
    cls = load_strategy(name)
    run_config = {
        "strategy": name,
        "data.server-examples": 1,
        **STRATEGY_OVERRIDES.get(name, {}),
        **(options or {}),
    }
    settings, options = parse_run_config(run_config, cls.options_class, options_prefix=name)
    strategy = cls(settings, profiles, options)
    # No model: rank strategies ask the server only for their initial adapter.
    strategy.server = SimpleNamespace(host=RandomAdapters(modules))
    return strategy


def random_updates(
    strategy: LoRAStrategy, global_state: State, clients: list[int], seed: int
) -> list[ClientUpdate]:
    """One reply per client: random arrays of exactly the shapes the strategy sends it."""
    rng = np.random.default_rng(seed)
    updates = []
    for client in clients:
        rank = strategy.client_rank(client)
        sent = adapter_state.trainable(strategy.distribute(global_state, rank))
        state = {key: rng.standard_normal(value.shape, np.float32) for key, value in sent.items()}
        metrics = {wire.TRAIN_LOSS: 1.0}
        scaling = strategy.source_scaling(rank)  # as the base converts an accepted reply
        updates.append(
            ClientUpdate(client, int(rng.integers(10, 1000)), rank, state, metrics, scaling)
        )
    return updates


def traced(function: Callable[..., Any], *args: Any) -> tuple[Any, float, int]:
    """``function(*args)``, its wall time and its peak of traced (Python and numpy) memory."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = function(*args)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, seconds, peak


def rank_strategy_names() -> list[str]:
    """Registered strategies that aggregate ranks of factor pairs (layer strategies, methods
    whose clients keep a factor, and broken plugins left out)."""
    names = []
    for name in strategy_names():
        try:
            cls = load_strategy(name)
        except ConfigError:
            continue
        if not issubclass(cls, LayerStrategy) and not cls.personal:
            names.append(name)
    return names


def reference_accumulation(updates: Sequence[ClientUpdate]) -> LoraPairs:
    """Item 3a's reference, the streaming bound: every reply added once, in place, into float32
    arrays of the global shapes (the largest reply rank of each module), module by module,

        B[:, :r_k] += w_k B_k,   A[:r_k, :] += w_k A_k,   w_k = 1 / K,

    with nothing else: no padding, no weights to compute, no checks."""
    replies = [u.lora for u in updates]
    weight = 1.0 / len(replies)
    summed = {}
    for module in replies[0]:
        pairs = [lora[module] for lora in replies]
        rank = max(b.shape[1] for b, _ in pairs)
        total_b = np.zeros((pairs[0][0].shape[0], rank), np.float32)
        total_a = np.zeros((rank, pairs[0][1].shape[1]), np.float32)
        for b, a in pairs:
            r = b.shape[1]
            total_b[:, :r] += weight * b
            total_a[:r, :] += weight * a
        summed[module] = (total_b, total_a)
    return summed


def best_seconds(functions: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """The least wall time of each function over ``repeats`` rounds in which they run in turn,
    so that a change of the machine's load touches them alike."""
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for i, function in enumerate(functions):
            started = time.perf_counter()
            function()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def gemm_rates(
    modules: dict[str, tuple[int, int]], total_rank: int, repeats: int = 3
) -> dict[str, float]:
    """Flop/s of one BLAS matrix product per dtype (float32, float64) on this machine: the
    widest module's ``d_out x R`` by ``R x d_in`` (``R = total_rank``), the product FLoRA and
    FlexLoRA form; best of ``repeats``."""
    d_out, d_in = max(modules.values(), key=lambda shape: shape[0] * shape[1])
    rng = np.random.default_rng(0)
    rates = {}
    for dtype in ("float32", "float64"):
        p = rng.standard_normal((d_out, total_rank)).astype(dtype)
        q = rng.standard_normal((total_rank, d_in)).astype(dtype)
        (seconds,) = best_seconds([lambda p=p, q=q: p @ q], repeats)
        rates[dtype] = 2 * d_out * d_in * total_rank / seconds
    return rates


def arithmetic(
    name: str, modules: dict[str, tuple[int, int]], ranks: Sequence[int], global_rank: int
) -> tuple[float, str] | None:
    """The floating-point operations of a method's products and their dtype, where they bound
    its time: FLoRA's merge (one product of the stacks, 2 d_out d_in R per module,
    :func:`~hetfed.lora_algebra.add_stacked_product`), FlexLoRA's
    :func:`~hetfed.lora_algebra.factored_svd_flops`, HetLoRA's sparsity weights (two Gram
    matrices per reply and module, (d_out + d_in) r_k^2, :func:`~hetfed.lora_algebra.
    product_frobenius_norm`); None for the methods that only add replies."""
    total = sum(ranks)
    if name == "flora":
        return sum(2.0 * d_out * d_in * total for d_out, d_in in modules.values()), "float32"
    if name == "flexlora":
        flops = sum(
            la.factored_svd_flops(d_out, d_in, ranks, min(global_rank, d_out, d_in, total))
            for d_out, d_in in modules.values()
        )
        return flops, "float64"
    if name == "hetlora":
        squares = sum(r * r for r in ranks)
        return sum(float(d_out + d_in) * squares for d_out, d_in in modules.values()), "float32"
    return None


def reference_row(rows: Sequence[dict[str, Any]], ranks: list[int]) -> dict[str, Any]:
    """The reference's own row: on the replies of every tier (``ranks`` = [smallest, largest];
    fedit's one-rank replies left out), the median of its timings beside each strategy."""
    rows = [row for row in rows if row["ranks"] == ranks] or list(rows)
    seconds = float(np.median([row["reference_seconds"] for row in rows]))
    reply_bytes = rows[0]["reply_bytes"]
    return {
        "strategy": "reference",
        "clients": rows[0]["clients"],
        "ranks": rows[0]["ranks"],
        "reply_bytes": reply_bytes,
        "seconds": seconds,
        "gb_per_second": reply_bytes / seconds / 1e9,
    }


def strategy_row(
    name: str,
    modules: dict[str, tuple[int, int]],
    profiles: DeviceProfiles,
    num_clients: int,
    seed: int,
    repeats: int,
) -> dict[str, Any]:
    """One strategy's row of :func:`server_aggregation`."""
    strategy = rank_strategy(name, modules, profiles)
    clients = strategy.register_clients(SimulatedNodes(num_clients, {}, seed))
    global_state = strategy.initial_state()
    updates = random_updates(strategy, global_state, clients, seed)
    for update in updates:  # split once, outside every timing
        _ = update.lora, update.head
    reference_seconds, seconds = best_seconds(
        [
            lambda: reference_accumulation(updates),
            lambda: strategy.aggregate(1, updates, global_state),
        ],
        repeats,
    )
    _, _, peak = traced(strategy.aggregate, 1, updates, global_state)
    client_ranks = [u.rank for u in updates]
    reply_bytes = sum(wire.nbytes(u.state) for u in updates)
    row = {
        "strategy": name,
        "clients": len(updates),
        "ranks": [min(client_ranks), max(client_ranks)],
        "total_rank": sum(client_ranks),
        "reply_bytes": reply_bytes,
        "seconds": seconds,
        "gb_per_second": reply_bytes / seconds / 1e9,
        "reference_seconds": reference_seconds,
        "reference_gb_per_second": reply_bytes / reference_seconds / 1e9,
        "percent_of_reference": 100 * reference_seconds / seconds,
        "peak_bytes": peak,
        "note": STRATEGY_NOTES.get(name, ""),
    }
    work = arithmetic(name, modules, client_ranks, strategy.global_rank())
    if work is not None:
        row |= {"flops": work[0], "flops_dtype": work[1]}
    return row


def server_aggregation(
    num_clients: int = 100,
    ranks: Sequence[int] = (4, 8, 16, 32, 64),
    block: dict[str, tuple[int, int]] = SMOLLM2_135M_BLOCK,
    layers: int = SMOLLM2_135M_LAYERS,
    strategies: Sequence[str] | None = None,
    seed: int = 0,
    repeats: int = 3,
) -> dict[str, Any]:
    """Server aggregation time and peak memory of every rank strategy on random replies, side
    by side with the reference (:func:`reference_accumulation`) on the same replies.

    For each strategy (default: every registered one but the layer strategies): ``num_clients``
    clients register through :class:`SimulatedNodes` with tiers of ``ranks`` in equal shares, the
    strategy's own ``initial_state`` (random factors of the ``block`` x ``layers`` shapes) is the
    global state and every client replies random arrays of the shapes it is sent. The reference
    and the strategy's ``aggregate`` then run in turn ``repeats`` times (seconds: the least of
    each; percent of reference = reference seconds / strategy seconds, both on these replies),
    and ``aggregate`` once more under tracemalloc (peak bytes of Python and numpy allocations;
    LAPACK's work arrays are not traced). Reply GB/s = reply bytes / seconds. Where a method's
    time is bound by its products (:func:`arithmetic`) the row has their flops and the time they
    take at this machine's matrix-product rate (:func:`gemm_rates`, same dtype). helora-kd runs
    its FedAvg per rank group only (``epochs = 0``: no server model, no distillation); fedit
    trains every client at its one rank (the smallest tier's).
    """
    act_as_flower_task()
    modules = model_modules(block, layers)
    profiles = rank_profiles(ranks)
    names = strategies if strategies is not None else rank_strategy_names()
    rows = [strategy_row(name, modules, profiles, num_clients, seed, repeats) for name in names]
    rates = gemm_rates(modules, max(row["total_rank"] for row in rows))
    for row in rows:
        if "flops" in row:
            row["arithmetic_seconds"] = row["flops"] / rates[row["flops_dtype"]]
            row["times_arithmetic"] = row["seconds"] / row["arithmetic_seconds"]
    return {
        "block": block,
        "layers": layers,
        "modules": len(modules),
        "gemm_flops_per_second": rates,
        "reference": reference_row(rows, [min(ranks), max(ranks)]),
        "strategies": rows,
    }


def dense_svd(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], weights: Sequence[float], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The straightforward FlexLoRA server step, the reference for ``la.factored_svd``.

    ``W = sum_k w_k B_k A_k`` formed densely (``d_out x d_in``, float64, one client at a time),
    then a full SVD ``W = U diag(S) V^T`` (``np.linalg.svd``, reduced); returns
    ``(U[:, :rank], S[:rank], V^T[:rank, :])`` in the inputs' dtype, as
    :func:`~hetfed.lora_algebra.factored_svd` does.
    """
    total = np.zeros((bs[0].shape[0], as_[0].shape[1]))
    for weight, b, a in zip(weights, bs, as_, strict=True):
        total += (weight * b.astype(np.float64)) @ a.astype(np.float64)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    dtype = np.result_type(*bs, *as_)
    return u[:, :rank].astype(dtype), s[:rank].astype(dtype), vt[:rank].astype(dtype)


def per_shape(block: dict[str, tuple[int, int]]) -> list[str]:
    """The first module of each distinct shape of ``block``."""
    first: dict[tuple[int, int], str] = {}
    for module, shape in block.items():
        first.setdefault(shape, module)
    return list(first.values())


def flexlora_large(
    num_clients: int = 100,
    ranks: Sequence[int] = (4, 8, 16),
    block: dict[str, tuple[int, int]] = LLAMA_7B_BLOCK,
    dense_modules: str = "per-shape",
    seed: int = 0,
) -> dict[str, Any]:
    """FlexLoRA's aggregation of one transformer block: factored against dense, per module.

    ``num_clients`` clients with ranks cycling through ``ranks`` reply random float32 factors of
    each module of ``block``; the weights are FlexLoRA's, w_k = p_k s_k (random data sizes,
    s_k = 16 / r_k), and the target rank is max(``ranks``). Each module is aggregated with
    :func:`~hetfed.lora_algebra.factored_svd` and - on every module (``dense_modules="all"``) or
    on the first module of each shape (``"per-shape"``, since a full SVD of a 11008 x 4096 matrix
    takes minutes) - with :func:`dense_svd`. Time is wall seconds; memory is the tracemalloc peak
    (numpy arrays; LAPACK's work arrays inside ``np.linalg.svd`` are not traced, so the dense
    peak is a lower bound). ``speedup`` and ``memory_ratio`` are dense / factored summed (time)
    or maxed (peak) over the modules measured both ways; ``max_singular_value_difference`` is
    max |S_factored - S_dense| / S_dense[0] over them.
    """
    rng = np.random.default_rng(seed)
    client_ranks = [ranks[k % len(ranks)] for k in range(num_clients)]
    p = la.normalize_weights(rng.integers(10, 1000, size=num_clients))
    weights = [pk * LORA_ALPHA / r for pk, r in zip(p, client_ranks, strict=True)]
    target = max(ranks)
    measure_dense = set(block if dense_modules == "all" else per_shape(block))
    rows = []
    for module, (d_out, d_in) in block.items():
        bs = [rng.standard_normal((d_out, r), np.float32) for r in client_ranks]
        as_ = [rng.standard_normal((r, d_in), np.float32) for r in client_ranks]
        factored, f_seconds, f_peak = traced(la.factored_svd, bs, as_, weights, target)
        row = {
            "module": module,
            "shape": [d_out, d_in],
            "factored_seconds": f_seconds,
            "factored_peak_bytes": f_peak,
        }
        if module in measure_dense:
            dense, d_seconds, d_peak = traced(dense_svd, bs, as_, weights, target)
            row |= {
                "dense_seconds": d_seconds,
                "dense_peak_bytes": d_peak,
                "singular_value_difference": float(
                    np.max(np.abs(factored[1] - dense[1])) / dense[1][0]
                ),
            }
        rows.append(row)
        del bs, as_
    both = [r for r in rows if "dense_seconds" in r]
    return {
        "clients": num_clients,
        "ranks": list(ranks),
        "target_rank": target,
        "dense_modules": [r["module"] for r in both],
        "modules": rows,
        "factored_seconds_all_modules": sum(r["factored_seconds"] for r in rows),
        "speedup": sum(r["dense_seconds"] for r in both) / sum(r["factored_seconds"] for r in both),
        "memory_ratio": max(r["dense_peak_bytes"] for r in both)
        / max(r["factored_peak_bytes"] for r in both),
        "max_singular_value_difference": max(r["singular_value_difference"] for r in both),
    }
