"""The streaming aggregation against the straightforward formulas it replaced, kept here.

The references pad every reply to the global rank and sum the padded copies in float64
(zero-padding, FedIT, HetLoRA, HeLoRA-Pad, HeLoRA-KD's groups), average each rank index in
float64 (RBLA), weight HetLoRA's replies from float64 Gram matrices, merge FLoRA's stacks with a
float64 product and decompose FlexLoRA's dense sum with a full SVD. On bench-like random replies
(48 float32 replies of ranks 2..16) every method's new global state equals its reference's to
1e-5 of the largest entry. Singular vectors are unique only up to sign, so FlexLoRA is compared
on what its clients get: the products of every truncation of the new global factors.
"""

from __future__ import annotations

import numpy as np
import pytest

from hetfed import adapter_state
from strategies.replies import ClientUpdate
from tooling.bench.aggregation import (
    model_modules,
    random_updates,
    rank_profiles,
    rank_strategy,
)
from tooling.bench.common import SimulatedNodes, act_as_flower_task

BLOCK = {"self_attn.q_proj": (48, 40), "self_attn.k_proj": (16, 40), "mlp.down_proj": (40, 96)}
MODULES = model_modules(BLOCK, 2)
CLIENTS = 48
RANKS = (2, 4, 8, 16)


# ------------------------------------------------------------------ the replaced formulas


def old_pad(b: np.ndarray, a: np.ndarray, rank: int, filler: str):
    """A padded copy of one reply, its fillers' means in float64."""
    extra = rank - b.shape[1]
    if filler == "zero":
        new_b, new_a = np.zeros((b.shape[0], extra)), np.zeros((extra, a.shape[1]))
    elif filler == "mean":
        new_b = np.full((b.shape[0], extra), b.mean(dtype=np.float64))
        new_a = np.full((extra, a.shape[1]), a.mean(dtype=np.float64))
    elif filler == "linear":
        new_b = np.repeat(b.mean(axis=1, dtype=np.float64)[:, None], extra, axis=1)
        new_a = np.repeat(a.mean(axis=0, dtype=np.float64)[None, :], extra, axis=0)
    else:  # adjacent
        new_b, new_a = np.repeat(b[:, -1:], extra, axis=1), np.repeat(a[-1:, :], extra, axis=0)
    return (
        np.concatenate([b, new_b.astype(b.dtype)], axis=1),
        np.concatenate([a, new_a.astype(a.dtype)], axis=0),
    )


def old_padded_sum(pairs, weights, rank: int, filler: str = "zero"):
    """sum_k w_k pad(B_k, A_k): every reply padded, the copies summed in float64."""
    padded = [old_pad(b, a, rank, filler) for b, a in pairs]
    total_b = sum(w * b.astype(np.float64) for w, (b, _) in zip(weights, padded, strict=True))
    total_a = sum(w * a.astype(np.float64) for w, (_, a) in zip(weights, padded, strict=True))
    return total_b, total_a


def old_per_index_average(pairs, weights, global_b, global_a):
    """RBLA in float64: index i over the replies that hold it; indices none holds kept."""
    num_b, num_a = np.zeros(global_b.shape), np.zeros(global_a.shape)
    den = np.zeros(global_b.shape[1])
    for w, (b, a) in zip(weights, pairs, strict=True):
        r = b.shape[1]
        num_b[:, :r] += w * b
        num_a[:r] += w * a
        den[:r] += w
    held = max(b.shape[1] for b, _ in pairs)
    num_b[:, :held] /= den[:held]
    num_a[:held] /= den[:held, None]
    num_b[:, held:], num_a[held:] = global_b[:, held:], global_a[held:]
    return num_b, num_a


def old_norm(b: np.ndarray, a: np.ndarray) -> float:
    """||B A||_F from float64 Gram matrices."""
    b, a = b.astype(np.float64), a.astype(np.float64)
    return float(np.sqrt(max(np.sum((b.T @ b) * (a @ a.T)), 0.0)))


def old_sparsity_weights(updates: list[ClientUpdate], per_module: bool):
    """HetLoRA's S_k / sum S, per module or one per reply over all its modules."""
    norms = np.array([[old_norm(*u.lora[m]) for m in MODULES] for u in updates])
    if not per_module:
        norms = np.repeat(np.sqrt((norms**2).sum(axis=1, keepdims=True)), len(MODULES), axis=1)
    return {m: norms[:, j] / norms[:, j].sum() for j, m in enumerate(MODULES)}


def data_weights(updates: list[ClientUpdate], factor=lambda u: 1) -> np.ndarray:
    weights = np.array([u.num_examples * factor(u) for u in updates], dtype=np.float64)
    return weights / weights.sum()


def old_lora(name: str, options: dict, updates: list[ClientUpdate], global_state) -> dict:
    """The reference's new LoRA arrays (and FLoRA's deltas) by state key."""
    global_lora = adapter_state.split_state(global_state)[0]
    pairs = {m: [u.lora[m] for u in updates] for m in MODULES}
    lora = {}
    if name in ("zeropad", "fedit", "hetlora", "helora-pad"):
        if name == "hetlora":
            weighting = options.get("hetlora.weighting", "sparsity")
            weights = old_sparsity_weights(updates, weighting == "sparsity-per-module")
        elif name == "helora-pad":
            weights = dict.fromkeys(MODULES, data_weights(updates, lambda u: u.rank))
        else:
            weights = dict.fromkeys(MODULES, data_weights(updates))
        filler = options.get("helora-pad.filler", "linear" if name == "helora-pad" else "zero")
        if options.get("helora-pad.aggregation") == "per-rank-index":
            weights = dict.fromkeys(MODULES, data_weights(updates))
            for m, (gb, ga) in global_lora.items():
                lora[m] = old_per_index_average(pairs[m], weights[m], gb, ga)
        else:
            for m, (gb, _) in global_lora.items():
                lora[m] = old_padded_sum(pairs[m], weights[m], gb.shape[1], filler)
    elif name == "rbla":
        for m, (gb, ga) in global_lora.items():
            lora[m] = old_per_index_average(pairs[m], data_weights(updates), gb, ga)
    elif name == "helora-kd":
        for rank in sorted({u.rank for u in updates}):
            group = [u for u in updates if u.rank == rank]
            for m in MODULES:
                b, a = old_padded_sum([u.lora[m] for u in group], data_weights(group), rank)
                lora[f"group-r{rank}/{m}"] = (b, a)
    elif name == "flora":
        weights = data_weights(updates) * np.array([u.scaling for u in updates])
        deltas = adapter_state.base_deltas(global_state)
        return {
            f"{m}.base_layer.delta": deltas[m].astype(np.float64)
            + sum(w * b.astype(np.float64) @ a for w, (b, a) in zip(weights, pairs[m], strict=True))
            for m in MODULES
        }
    return {key: value for m, (b, a) in lora.items() for key, value in _keys(m, b, a).items()}


def _keys(module: str, b: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{module}.lora_B.weight": b, f"{module}.lora_A.weight": a}


def old_flexlora_products(updates: list[ClientUpdate], global_lora, r_max: int, s_g: float):
    """s_g B[:, :r] A[:r] of FlexLoRA's old route (full SVD of the dense float64 sum), for every
    truncation r a client or the server holds."""
    weights = data_weights(updates) * np.array([u.scaling for u in updates])
    total = sum(u.rank for u in updates)
    products = {}
    for m, (gb, ga) in global_lora.items():
        dense = sum(
            w * u.lora[m][0].astype(np.float64) @ u.lora[m][1]
            for w, u in zip(weights, updates, strict=True)
        )
        u_, s, vt = np.linalg.svd(dense, full_matrices=False)
        rank = min(r_max, gb.shape[0], ga.shape[1], total)
        b = (u_[:, :rank] * s[:rank] / s_g).astype(np.float32)
        a = vt[:rank].astype(np.float32)
        for r in {*[u.rank for u in updates], r_max}:
            kept = min(r, rank)
            products[m, r] = s_g * b[:, :kept].astype(np.float64) @ a[:kept]
    return products


# ------------------------------------------------------------------------------ the tests


def assert_equal_to_1e5(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


def replies(name: str, options: dict, clients: int = CLIENTS, ranks=RANKS, seed: int = 0):
    """A strategy of the bench's making, its global state and random float32 replies."""
    act_as_flower_task()
    strategy = rank_strategy(name, MODULES, rank_profiles(ranks), options)
    client_ids = strategy.register_clients(SimulatedNodes(clients, {}, seed))
    global_state = strategy.initial_state()
    if name == "flora":  # merge into deltas that are not zero
        rng = np.random.default_rng(seed + 1)
        global_state = adapter_state.with_base_deltas(
            global_state,
            {m: rng.standard_normal(shape).astype(np.float32) for m, shape in MODULES.items()},
        )
    return strategy, global_state, random_updates(strategy, global_state, client_ids, seed)


CASES = [
    ("zeropad", {}),
    ("fedit", {}),
    ("hetlora", {}),
    ("hetlora", {"hetlora.weighting": "sparsity-per-module"}),
    ("helora-pad", {}),
    ("helora-pad", {"helora-pad.filler": "zero"}),
    ("helora-pad", {"helora-pad.filler": "mean"}),
    ("helora-pad", {"helora-pad.filler": "adjacent"}),
    ("helora-pad", {"helora-pad.aggregation": "per-rank-index"}),
    ("rbla", {}),
    ("helora-kd", {}),
    ("flora", {}),
]


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}{o}" for n, o in CASES])
def test_every_method_equals_its_old_padded_formula(name, options):
    strategy, global_state, updates = replies(name, options)
    new = strategy.aggregate(1, updates, global_state)
    expected = old_lora(name, options, updates, global_state)
    assert expected
    for key, value in expected.items():
        assert new[key].dtype == np.float32 and new[key].shape == value.shape, key
        assert_equal_to_1e5(new[key], value, key)


@pytest.mark.parametrize(
    ("clients", "ranks"), [(CLIENTS, RANKS), (4, (2, 4))], ids=["dense-route", "factored-route"]
)
def test_flexlora_equals_the_full_svd_of_the_dense_sum(clients, ranks):
    strategy, global_state, updates = replies("flexlora", {}, clients, ranks)
    total = sum(u.rank for u in updates)
    dense = total >= min(min(shape) for shape in MODULES.values())
    assert dense == (clients == CLIENTS)  # both of factored_svd's routes are taken
    new = adapter_state.split_state(strategy.aggregate(1, updates, global_state))[0]
    r_max, s_g = strategy.global_rank(), strategy.global_spec().scaling
    global_lora = adapter_state.split_state(global_state)[0]
    for (module, r), expected in old_flexlora_products(updates, global_lora, r_max, s_g).items():
        b, a = new[module]
        assert_equal_to_1e5(s_g * b[:, :r].astype(np.float64) @ a[:r], expected, f"{module} {r}")
