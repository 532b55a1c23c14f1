"""Fed-HeLLo's layer allocation (hetfed/layer_allocation.py): patterns, GD-HLA, RGD-HLA, FIM-HLA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetfed.adapter_state import layer_of
from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.layer_allocation import (
    BOTTLENECK_12,
    FIM_CLUSTER_PROBABILITIES,
    PATTERNS,
    deterministic_allocation,
    fisher_layer_scores,
    fisher_probabilities,
    kmeans_1d,
    pattern_probabilities,
    sample_layers,
)
from hetfed.models import ModelConfig, build_classifier

# ------------------------------------------------------------------------------------------
# patterns
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("num_layers", [1, 2, 5, 6, 12, 13, 24])
def test_patterns_are_probability_vectors(pattern: str, num_layers: int) -> None:
    p = pattern_probabilities(pattern, num_layers)
    assert p.shape == (num_layers,)
    assert np.all(p > 0)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("num_layers", [2, 7, 12])
def test_pattern_shapes(num_layers: int) -> None:
    np.testing.assert_allclose(pattern_probabilities("uniform", num_layers), 1 / num_layers)
    triangle = pattern_probabilities("triangle", num_layers)
    inverted = pattern_probabilities("inverted-triangle", num_layers)
    assert np.all(np.diff(triangle) < 0)  # more clients on shallow layers
    assert np.all(np.diff(inverted) > 0)  # more clients on deep layers
    total = num_layers * (num_layers + 1) / 2
    np.testing.assert_allclose(triangle, (num_layers - np.arange(num_layers)) / total)
    np.testing.assert_allclose(inverted, triangle[::-1])


def test_bottleneck_12_is_the_authors_list() -> None:
    code = np.array([3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3]) / 27  # the authors' values
    np.testing.assert_allclose(BOTTLENECK_12, code)
    np.testing.assert_allclose(pattern_probabilities("bottleneck", 12), code / code.sum())


def test_bottleneck_resampled_to_6_layers_averages_pairs() -> None:
    p = pattern_probabilities("bottleneck", 6)
    # pairs (3,3), (3,2), (2,1), (1,1), (2,3), (3,3) / 27 averaged, then normalised (sum 13.5)
    np.testing.assert_allclose(p, [2 / 9, 5 / 27, 1 / 9, 2 / 27, 5 / 27, 2 / 9], rtol=1e-12)
    assert p[0] == p[-1] == p.max()  # high at both ends
    assert p.argmin() == 3 and p[1] > p[2] > p[3] < p[4]  # low in the middle


def test_bottleneck_resampling_with_partial_overlaps() -> None:
    ref = np.array(BOTTLENECK_12)
    # L = 24: every reference value twice; L = 8: spans of 1.5 reference layers
    np.testing.assert_allclose(
        pattern_probabilities("bottleneck", 24), np.repeat(ref, 2) / np.repeat(ref, 2).sum()
    )
    # L = 8: layer l covers [1.5 l, 1.5 l + 1.5), e.g. layer 0 = (ref_0 + ref_1 / 2) / 1.5
    p8 = pattern_probabilities("bottleneck", 8)
    np.testing.assert_allclose(p8, np.array([4.5, 4.5, 3, 2, 1.5, 2.5, 4.5, 4.5]) / 27, rtol=1e-12)
    assert pattern_probabilities("bottleneck", 1) == pytest.approx([1.0])


@pytest.mark.parametrize(
    ("pattern", "num_layers"),
    [("pyramid", 12), ("uniform", 0), ("uniform", 2.0), ("triangle", True)],
)
def test_pattern_rejects_bad_input(pattern: str, num_layers: object) -> None:
    with pytest.raises(ValueError):
        pattern_probabilities(pattern, num_layers)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# deterministic GD-HLA
# ------------------------------------------------------------------------------------------


def _counts(allocation: list[list[int]], num_layers: int) -> np.ndarray:
    counts = np.zeros(num_layers)
    for layers in allocation:
        counts[layers] += 1
    return counts


def _within_one_is_feasible(budgets: list[int], targets: np.ndarray) -> bool:
    """Whether some allocation has every |count_l - t_l| < 1 (Gale-Ryser on the flattest choice).

    Counts must be t_l when t_l is an integer, else floor or ceil; the choice with the ceilings
    on the smallest floors is majorised by every other choice, so it is feasible iff any is.
    """
    clients, num_layers = len(budgets), len(targets)
    rounded = np.round(targets)
    integer = np.abs(targets - rounded) < 1e-9
    low = np.where(integer, rounded, np.floor(targets))
    high = np.minimum(np.where(integer, rounded, low + 1), clients)
    extra = int(round(sum(budgets) - low.sum()))
    room = [int(i) for i in np.argsort(low, kind="stable") if high[i] > low[i]]
    if extra < 0 or extra > len(room) or np.any(low > clients):
        return False
    counts = low.copy()
    counts[room[:extra]] += 1
    conjugate = [sum(b >= j for b in budgets) for j in range(1, num_layers + 1)]
    return bool(np.all(np.cumsum(np.sort(counts)[::-1]) <= np.cumsum(conjugate)))


def test_gd_hla_follows_the_pattern_whenever_the_budgets_allow() -> None:
    rng = np.random.default_rng(2024)
    feasible = 0
    for trial in range(1500):
        num_layers = int(rng.integers(1, 15))
        clients = int(rng.integers(1, 25))
        budgets = rng.integers(1, num_layers + 1, size=clients).tolist()
        p = pattern_probabilities(PATTERNS[trial % len(PATTERNS)], num_layers)
        allocation = deterministic_allocation(budgets, p)
        assert [len(layers) for layers in allocation] == budgets
        for layers in allocation:
            assert layers == sorted(set(layers))
            assert all(0 <= layer < num_layers for layer in layers)
        counts = _counts(allocation, num_layers)
        targets = p * sum(budgets)
        if _within_one_is_feasible(budgets, targets):
            feasible += 1
            assert np.all(np.abs(counts - targets) < 1), (budgets, targets, counts)
    assert feasible > 1000  # the check above ran on most configurations


def test_gd_hla_typical_fed_hello_profile() -> None:
    # the authors' groups: K in {6, 9, 12} of L = 12, here 30 clients, bottleneck pattern
    budgets = [6] * 10 + [9] * 10 + [12] * 10
    p = pattern_probabilities("bottleneck", 12)
    allocation = deterministic_allocation(budgets, p)
    counts = _counts(allocation, 12)
    targets = p * sum(budgets)
    assert np.all(np.abs(counts - targets) < 1)
    assert counts[0] > counts[4] > counts[6] < counts[8] < counts[11]


def test_gd_hla_is_deterministic_and_full_budgets_get_every_layer() -> None:
    p = pattern_probabilities("triangle", 8)
    budgets = [3, 5, 1, 8, 5, 2]
    first = deterministic_allocation(budgets, p)
    assert deterministic_allocation(budgets, p) == first
    assert deterministic_allocation(tuple(budgets), p.copy()) == first
    assert first[3] == list(range(8))
    assert deterministic_allocation([8, 8, 8], p) == [list(range(8))] * 3
    # worked by hand, uniform L = 3, budgets [1, 1, 2]: t = 4/3 each. Client 2 (largest budget)
    # goes first: layers 0, 1 -> deficits (1/3, 1/3, 4/3); client 0: layer 2 -> (1/3, 1/3, 1/3);
    # client 1: tie, lowest index -> layer 0
    assert deterministic_allocation([1, 1, 2], np.full(3, 1 / 3)) == [[2], [0], [0, 1]]
    # one client of budget 1 takes the most probable layer
    assert deterministic_allocation([1], p) == [[0]]
    assert deterministic_allocation([1], pattern_probabilities("inverted-triangle", 8)) == [[7]]


@pytest.mark.parametrize(
    ("budgets", "probabilities"),
    [
        ([], [0.5, 0.5]),
        ([0], [0.5, 0.5]),
        ([3], [0.5, 0.5]),
        ([1.5], [0.5, 0.5]),
        ([1], [0.5, 0.6]),
        ([1], [1.5, -0.5]),
        ([1], [np.nan, 1.0]),
        ([1], []),
    ],
)
def test_gd_hla_rejects_bad_input(budgets: list, probabilities: list) -> None:
    with pytest.raises(ValueError):
        deterministic_allocation(budgets, np.array(probabilities, dtype=float))


# ------------------------------------------------------------------------------------------
# RGD-HLA
# ------------------------------------------------------------------------------------------


def test_rgd_hla_budget_one_frequencies_match_p() -> None:
    rng = np.random.default_rng(7)
    p = pattern_probabilities("bottleneck", 12)
    draws = 20_000
    counts = np.zeros(12)
    for _ in range(draws):
        (layer,) = sample_layers(rng, 1, p)
        counts[layer] += 1
    # binomial standard deviation <= sqrt(0.25 / 20000) = 0.0035: 0.01 is ~3 sigma
    np.testing.assert_allclose(counts / draws, p, atol=0.01)


def test_rgd_hla_larger_budgets_draw_distinct_layers_ordered_like_p() -> None:
    rng = np.random.default_rng(11)
    p = pattern_probabilities("triangle", 10)
    draws, budget = 5_000, 4
    inclusion = np.zeros(10)
    for _ in range(draws):
        layers = sample_layers(rng, budget, p)
        assert len(layers) == budget and layers == sorted(set(layers))
        inclusion[layers] += 1
    assert inclusion.sum() == draws * budget
    assert np.all(np.diff(inclusion) < 0)  # inclusion frequencies ordered like p
    # the same seed gives the same draws
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [sample_layers(a, 3, p) for _ in range(5)] == [sample_layers(b, 3, p) for _ in range(5)]
    assert sample_layers(rng, 10, p) == list(range(10))


def test_rgd_hla_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="non-zero"):
        sample_layers(rng, 3, p)
    with pytest.raises(ValueError):
        sample_layers(rng, 0, p)
    with pytest.raises(ValueError):
        sample_layers(rng, 4, p)
    with pytest.raises(ValueError):
        sample_layers(np.random.RandomState(0), 1, p)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sample_layers(rng, 1, np.array([0.7, 0.7]))


# ------------------------------------------------------------------------------------------
# FIM-HLA: Fisher scores
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_model():
    model, _ = build_classifier(ModelConfig(name="tiny-random-bert", max_length=16), 3, seed=0)
    peft_model = AdapterHost(model).activate(
        LoraSpec(rank=2, alpha=4.0, target_modules=("query", "value"))
    )
    generator = torch.Generator().manual_seed(0)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in params.items():
            if "lora_B" in name:  # peft starts B at 0: make the gradients of A non-zero
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert len(lora) == 8 and {layer_of(n) for n in lora} == {0, 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a loaded machine
    yield peft_model, lora, params
    torch.set_num_threads(threads)


def _examples(count: int = 6, length: int = 10, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 5000, (count, length), generator=generator)
    attention_mask = torch.ones(count, length, dtype=torch.long)
    for i in range(count):  # varied lengths with padding at the end
        attention_mask[i, 4 + i % (length - 4) :] = 0
    input_ids[attention_mask == 0] = 0
    labels = torch.randint(0, 3, (count,), generator=generator)
    return input_ids, attention_mask, labels


def _reference_scores(model, input_ids, attention_mask, labels, lora, num_layers) -> np.ndarray:
    """Example by example: autograd.grad of z_y, square, mean over examples, ||.||_F per layer."""
    model.eval()
    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in lora.items()}
    for i in range(len(labels)):
        logits = model(input_ids=input_ids[i : i + 1], attention_mask=attention_mask[i : i + 1])
        grads = torch.autograd.grad(logits[0, labels[i]], list(lora.values()))
        for name, grad in zip(lora, grads, strict=True):
            sums[name] += grad.double() ** 2
    scores = np.zeros(num_layers)
    for name, total in sums.items():
        scores[layer_of(name)] += torch.linalg.norm(total / len(labels)).item()  # Frobenius
    return scores


def test_fisher_scores_equal_a_per_example_computation(lora_model) -> None:
    model, lora, _ = lora_model
    input_ids, attention_mask, labels = _examples()
    expected = _reference_scores(model, input_ids, attention_mask, labels, lora, 2)
    assert np.all(expected > 0)
    model.train()
    got = fisher_layer_scores(model, input_ids, attention_mask, labels, lora, layer_of, 2, 4)
    assert got.shape == (2,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert model.training  # the training flag is restored
    assert all(p.grad is None for p in lora.values())  # no gradient left behind


def test_fisher_scores_average_over_examples_not_batches(lora_model) -> None:
    model, lora, params = lora_model
    input_ids, attention_mask, labels = _examples()
    model.eval()
    scores = [
        fisher_layer_scores(model, input_ids, attention_mask, labels, lora, layer_of, 2, size)
        for size in (1, 2, 4, 16)
    ]
    for other in scores[1:]:
        np.testing.assert_allclose(other, scores[0], rtol=1e-5)
    assert not model.training
    # head parameters (layer None) are ignored; a 4th layer without parameters scores 0
    with_head = fisher_layer_scores(model, input_ids, attention_mask, labels, params, layer_of, 4)
    np.testing.assert_allclose(with_head[:2], scores[0], rtol=1e-5)
    assert with_head[2] == with_head[3] == 0.0
    assert all(p.grad is None for p in params.values())
    # one example's Fisher is its squared gradient: the mean of two copies equals it
    one = fisher_layer_scores(
        model, input_ids[:1], attention_mask[:1], labels[:1], lora, layer_of, 2
    )
    two = fisher_layer_scores(
        model, input_ids[[0, 0]], attention_mask[[0, 0]], labels[[0, 0]], lora, layer_of, 2, 1
    )
    np.testing.assert_allclose(two, one, rtol=1e-6)


def test_fisher_scores_restore_frozen_parameters_and_reject_bad_input(lora_model) -> None:
    model, lora, _ = lora_model
    input_ids, attention_mask, labels = _examples(count=3)
    name = next(iter(lora))
    lora[name].requires_grad_(False)
    try:
        fisher_layer_scores(model, input_ids, attention_mask, labels, lora, layer_of, 2)
        assert not lora[name].requires_grad
    finally:
        lora[name].requires_grad_(True)
    bad_calls = [
        (input_ids, attention_mask, labels, lora, 1),  # layer 1 outside [0, 1)
        (input_ids, attention_mask[:, :5], labels, lora, 2),
        (input_ids, attention_mask, labels[:2], lora, 2),
        (input_ids, attention_mask, labels + 3, lora, 2),
        (input_ids, attention_mask, labels.float(), lora, 2),
        (input_ids, attention_mask, labels, {}, 2),
        (input_ids, attention_mask, labels, {"x.layer.0.w": torch.zeros(2)}, 2),  # not in model
    ]
    for ids, mask, ys, params, num_layers in bad_calls:
        with pytest.raises(ValueError):
            fisher_layer_scores(model, ids, mask, ys, params, layer_of, num_layers)
    assert all(p.grad is None for p in lora.values())


# ------------------------------------------------------------------------------------------
# FIM-HLA: clustering and probabilities
# ------------------------------------------------------------------------------------------


def test_kmeans_clusters_are_sorted_by_centroid() -> None:
    values = np.array([9.0, 0.1, 5.2, 0.3, 9.4, 5.0, 0.2, 8.8, 4.9, 0.0, 5.1, 9.1])
    labels, centroids = kmeans_1d(values, k=3)
    assert np.all(np.diff(centroids) > 0)
    np.testing.assert_array_equal(labels, [2, 0, 1, 0, 2, 1, 0, 2, 1, 0, 1, 2])
    for j, centroid in enumerate(centroids):
        assert centroid == pytest.approx(values[labels == j].mean())
    again = kmeans_1d(values, k=3)
    np.testing.assert_array_equal(again[0], labels)
    # labels follow the values' order whatever their position
    rng = np.random.default_rng(5)
    for _ in range(50):
        x = rng.exponential(size=int(rng.integers(3, 30)))
        labels, centroids = kmeans_1d(x, k=3)
        assert np.all(np.diff(centroids) > 0)
        order = np.argsort(x)
        assert np.all(np.diff(labels[order]) >= 0)  # 1-D clusters are intervals, sorted


def test_kmeans_with_fewer_distinct_values_than_k() -> None:
    labels, centroids = kmeans_1d(np.array([2.0, 2.0, 7.0, 2.0]), k=3)
    np.testing.assert_array_equal(labels, [0, 0, 1, 0])
    np.testing.assert_allclose(centroids, [2.0, 7.0])
    labels, centroids = kmeans_1d(np.array([4.0, 4.0]), k=3)
    np.testing.assert_array_equal(labels, [0, 0])
    np.testing.assert_allclose(centroids, [4.0])
    # many repeats of the low value: the quantile start would duplicate, the distinct one works
    labels, centroids = kmeans_1d(np.array([0.0] * 8 + [1.0, 10.0]), k=3)
    np.testing.assert_allclose(centroids, [0.0, 1.0, 10.0])
    for bad in (np.array([]), np.array([1.0, np.nan]), np.ones((2, 2))):
        with pytest.raises(ValueError):
            kmeans_1d(bad)
    with pytest.raises(ValueError):
        kmeans_1d(np.ones(3), k=0)


def test_fisher_probabilities_favour_high_scores() -> None:
    scores = np.array([0.2, 3.0, 0.25, 1.1, 3.2, 1.0, 0.1, 2.9])
    p = fisher_probabilities(scores)
    assert p.sum() == pytest.approx(1.0)
    low, mid, high = FIM_CLUSTER_PROBABILITIES
    weights = np.array([low, high, low, mid, high, mid, low, high])
    np.testing.assert_allclose(p, weights / weights.sum())
    assert set(np.flatnonzero(p == p.max())) == {1, 4, 7}
    # fewer clusters: the lowest keeps the lowest probability, the highest the highest
    two = fisher_probabilities(np.array([1.0, 1.0, 5.0]))
    np.testing.assert_allclose(two, np.array([low, low, high]) / (2 * low + high))
    np.testing.assert_allclose(fisher_probabilities(np.full(4, 0.3)), 0.25)
    # custom cluster probabilities (k = 2)
    np.testing.assert_allclose(fisher_probabilities(np.array([0.0, 9.0]), (1.0, 3.0)), [0.25, 0.75])
    with pytest.raises(ValueError):
        fisher_probabilities(scores, (0.5, 0.0, 0.5))
    with pytest.raises(ValueError):
        fisher_probabilities(np.array([]))
