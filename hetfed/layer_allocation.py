"""Which transformer layers each client trains: Fed-HeLLo's layer allocation (pure functions).

Reference: S. Zhang et al., "Fed-HeLLo: Efficient Federated Foundation Model Fine-Tuning with
Heterogeneous LoRA Allocation", arXiv 2506.12213. A client with budget K_c trains the LoRA modules
of K_c of the L transformer blocks; these functions decide which ones.

Notation: layers l = 0..L-1 (0 = closest to the embeddings), p = (p_0, ..., p_{L-1}) a
probability vector over layers, budgets K_c in [1, L].

- :func:`pattern_probabilities`: GD-HLA's geometric patterns [paper], with the authors' Bottleneck
  profile for L = 12 [code] and hetfed's triangles and resampled Bottleneck [choice].
- :func:`deterministic_allocation`: deterministic GD-HLA - a fixed allocation whose per-layer
  client counts follow p as closely as the budgets allow [paper; greedy rule: choice].
- :func:`sample_layers`: RGD-HLA - K_c distinct layers drawn without replacement with
  probabilities p [code].
- :func:`fisher_layer_scores`, :func:`kmeans_1d`, :func:`fisher_probabilities`: FIM-HLA - layer
  scores from the empirical diagonal Fisher, clustered into three groups that get probabilities
  1/27, 2/27, 1/9 from low to high score [code; sorting the clusters: choice].

No Flower imports; numpy everywhere and torch only for the Fisher scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

PATTERNS: tuple[str, ...] = ("uniform", "triangle", "inverted-triangle", "bottleneck")

# [code] The authors' Bottleneck probabilities for L = 12 (they sum to 1).
BOTTLENECK_12: tuple[float, ...] = (
    1 / 9,
    1 / 9,
    1 / 9,
    2 / 27,
    2 / 27,
    1 / 27,
    1 / 27,
    1 / 27,
    2 / 27,
    1 / 9,
    1 / 9,
    1 / 9,
)

# [code] FIM-HLA's probabilities of the low, middle and high Fisher-score clusters.
FIM_CLUSTER_PROBABILITIES: tuple[float, ...] = (1 / 27, 2 / 27, 1 / 9)

_SUM_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------
# GD-HLA patterns
# --------------------------------------------------------------------------------------------


def pattern_probabilities(pattern: str, num_layers: int) -> np.ndarray:
    """The normalised per-layer probabilities p (length ``num_layers``) of a GD-HLA pattern.

    With L = ``num_layers`` and l = 0..L-1:

    - ``uniform``: p_l = 1 / L.
    - ``triangle`` [choice]: p_l ∝ (L - l) - more clients on the shallow layers.
    - ``inverted-triangle`` [choice]: p_l ∝ (l + 1) - more clients on the deep layers.
    - ``bottleneck``: for L = 12 exactly the authors' :data:`BOTTLENECK_12` [code]
      (1/9, 1/9, 1/9, 2/27, 2/27, 1/27, 1/27, 1/27, 2/27, 1/9, 1/9, 1/9), normalised.
      For other L [choice] the 12-layer profile is resampled: treat it as a step function
      f(x) = BOTTLENECK_12[floor(x)] on x in [0, 12); layer l of L covers the span
      [12 l / L, 12 (l + 1) / L) and gets the average of f over that span (reference layers
      that overlap the span partially count by the length of the overlap), i.e.

          p_l ∝ (L / 12) * ∫_{12 l / L}^{12 (l+1) / L} f(x) dx,

      then p is normalised. For L = 6 each layer averages a pair of reference layers:
      p = (2/9, 5/27, 1/9, 2/27, 5/27, 2/9); for L = 24 each reference value is repeated twice.

    Raises ValueError for an unknown pattern or a ``num_layers`` that is not a positive integer.
    """
    num_layers = _positive_int(num_layers, "num_layers")
    if pattern not in PATTERNS:
        raise ValueError(
            f"unknown layer pattern {pattern!r}: expected one of {', '.join(PATTERNS)}"
        )
    layers = np.arange(num_layers, dtype=np.float64)
    if pattern == "uniform":
        weights = np.ones(num_layers)
    elif pattern == "triangle":
        weights = num_layers - layers
    elif pattern == "inverted-triangle":
        weights = layers + 1.0
    else:
        weights = _resample_profile(np.asarray(BOTTLENECK_12, dtype=np.float64), num_layers)
    return weights / weights.sum()


def _resample_profile(reference: np.ndarray, num_layers: int) -> np.ndarray:
    """Average of the step function ``reference[floor(x)]`` over each of ``num_layers`` spans."""
    size = len(reference)
    if num_layers == size:
        return reference.copy()
    edges = np.arange(size + 1, dtype=np.float64)  # reference layer j covers [j, j + 1)
    out = np.empty(num_layers)
    for layer in range(num_layers):
        start, stop = size * layer / num_layers, size * (layer + 1) / num_layers
        overlap = np.clip(np.minimum(edges[1:], stop) - np.maximum(edges[:-1], start), 0.0, None)
        out[layer] = float(overlap @ reference) / (stop - start)
    return out


# --------------------------------------------------------------------------------------------
# Deterministic GD-HLA and RGD-HLA
# --------------------------------------------------------------------------------------------


def deterministic_allocation(budgets: Sequence[int], probabilities: np.ndarray) -> list[list[int]]:
    """GD-HLA: give client c ``budgets[c]`` distinct layers so per-layer counts follow p.

    With B = sum_c K_c layer slots in all, layer l's target count is t_l = p_l * B. Clients are
    served in descending budget order (ties: lower client index first); each takes the K_c layers
    with the largest remaining deficit t_l - count_l (ties: lower layer index), and the counts of
    those layers go up by one. The result is deterministic (the same for every call and round).

    Whenever some allocation has every |count_l - t_l| < 1, this one does (checked in the tests
    against the Gale-Ryser condition on many random budgets and patterns). Otherwise the budgets
    forbid it - e.g. t_l > number of clients with a steep pattern and large budgets, or more
    clients of budget L than t_l + 1 - and the counts only approach p.

    Returns one sorted list of layer indices per client, in the order of ``budgets``.
    Raises ValueError for an empty budget list, a budget outside [1, L] or invalid p.
    """
    p = _check_probabilities(probabilities)
    num_layers = len(p)
    checked = [_budget(b, num_layers, f"budgets[{c}]") for c, b in enumerate(budgets)]
    if not checked:
        raise ValueError("budgets is empty: expected at least one client budget")
    targets = p * float(sum(checked))
    counts = np.zeros(num_layers)
    allocation: list[list[int]] = [[] for _ in checked]
    for client in sorted(range(len(checked)), key=lambda c: (-checked[c], c)):
        deficit = targets - counts
        # stable sort on -deficit: largest deficit first, lower layer index on ties
        chosen = np.argsort(-deficit, kind="stable")[: checked[client]]
        counts[chosen] += 1
        allocation[client] = sorted(int(layer) for layer in chosen)
    return allocation


def sample_layers(rng: np.random.Generator, budget: int, probabilities: np.ndarray) -> list[int]:
    """RGD-HLA [code]: ``budget`` distinct layers drawn without replacement with probabilities p.

    ``rng.choice(L, size=budget, replace=False, p=p)`` (numpy's successive draws: each pick is
    drawn with probability proportional to p among the layers not yet picked), returned sorted.
    Raises ValueError for a budget outside [1, L], invalid p, or fewer layers with p_l > 0 than
    the budget.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    p = _check_probabilities(probabilities)
    budget = _budget(budget, len(p), "budget")
    positive = int(np.count_nonzero(p))
    if budget > positive:
        raise ValueError(
            f"budget {budget} exceeds the {positive} layers with a non-zero probability: "
            "cannot draw that many distinct layers"
        )
    drawn = rng.choice(len(p), size=budget, replace=False, p=p)
    return sorted(int(layer) for layer in drawn)


# --------------------------------------------------------------------------------------------
# FIM-HLA
# --------------------------------------------------------------------------------------------


def fisher_layer_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    parameters: Mapping[str, torch.Tensor],
    layer_of: Callable[[str], int | None],
    num_layers: int,
    batch_size: int = 16,
) -> np.ndarray:
    """FIM-HLA's per-layer scores from the empirical diagonal Fisher of the given parameters.

    For N examples (x_i, y_i) and z_y(x) the logit of the true label ([code]: the logit, not the
    log-probability), each parameter tensor theta gets

        F_theta = (1 / N) * sum_i (d z_{y_i}(x_i) / d theta)^2        (elementwise square)

    - the mean over EXAMPLES (the authors' code divided by the number of batches, a defect hetfed
    does not copy), and layer l's score is

        s_l = sum over the parameters theta with layer_of(name) == l of ||F_theta||_F.

    Parameters whose ``layer_of(name)`` is None (e.g. the head) are ignored; layers without
    parameters score 0. ``model(input_ids=..., attention_mask=...)`` must return logits [N, C].

    Computation: the model runs in eval mode (dropout off) on batches of ``batch_size``
    examples; within a batch each example's gradient is taken separately with
    ``torch.autograd.grad`` of its own z_y (``retain_graph``), so the per-example gradients are
    exact (in eval mode the examples of a batch do not interact) and the squares are summed in
    float64, then divided by N. ``batch_size`` only trades memory for speed: the result does not
    depend on it (up to float rounding of batched matmuls). ``torch.autograd.grad`` never writes
    ``.grad``, so no gradient is left on the parameters; parameters that do not require
    gradients are switched on for the computation and switched back afterwards, and
    ``model``'s (per-module) training flags are restored.

    Returns a float64 array of length ``num_layers``. Raises ValueError for mismatched shapes,
    labels outside [0, C), an out-of-range layer index, no parameter inside any layer, or a
    parameter the logits do not depend on.
    """
    num_layers = _positive_int(num_layers, "num_layers")
    batch_size = _positive_int(batch_size, "batch_size")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, T], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    count = input_ids.shape[0]
    if count == 0:
        raise ValueError("no examples: input_ids has N = 0 rows")
    if labels.shape != (count,):
        raise ValueError(f"labels must have shape ({count},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")

    names: list[str] = []
    layers: list[int] = []
    tensors: list[torch.Tensor] = []
    for name, tensor in parameters.items():
        layer = layer_of(name)
        if layer is None:
            continue
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer_of({name!r}) = {layer} is outside [0, {num_layers})")
        if not tensor.is_floating_point():
            raise ValueError(f"parameter {name!r} is not a floating-point tensor")
        names.append(name)
        layers.append(int(layer))
        tensors.append(tensor)
    if not tensors:
        raise ValueError("none of the given parameters belongs to a layer (layer_of gave None)")

    modes = {module: module.training for module in model.modules()}
    switched = [t for t in tensors if not t.requires_grad]
    sums = [torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in tensors]
    device = tensors[0].device
    try:
        model.eval()
        for tensor in switched:
            tensor.requires_grad_(True)
        with torch.enable_grad():
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                logits = model(
                    input_ids=input_ids[start:stop].to(device),
                    attention_mask=attention_mask[start:stop].to(device),
                )
                if logits.dim() != 2 or logits.shape[0] != stop - start:
                    raise ValueError(
                        f"the model must return logits [N, C], got shape {tuple(logits.shape)}"
                    )
                batch_labels = labels[start:stop].to(logits.device)
                if bool((batch_labels < 0).any()) or bool((batch_labels >= logits.shape[1]).any()):
                    raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
                true_logits = logits.gather(1, batch_labels.long().unsqueeze(1)).squeeze(1)
                for i in range(stop - start):
                    grads = torch.autograd.grad(
                        true_logits[i],
                        tensors,
                        retain_graph=i < stop - start - 1,
                        allow_unused=True,
                    )
                    for k, grad in enumerate(grads):
                        if grad is None:
                            raise ValueError(
                                f"the logits do not depend on parameter {names[k]!r} (is it in "
                                "the model, and its adapter active?)"
                            )
                        sums[k] += grad.detach().to(torch.float64).square()
    finally:
        for tensor in switched:
            tensor.requires_grad_(False)
        for module, training in modes.items():
            module.training = training

    scores = np.zeros(num_layers, dtype=np.float64)
    for layer, total in zip(layers, sums, strict=True):
        scores[layer] += float(torch.linalg.vector_norm(total / count))
    return scores


def kmeans_1d(
    values: np.ndarray, k: int = 3, iterations: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1-D k-means (Lloyd) with clusters sorted by centroid.

    Initial centroids: the quantiles (2 j + 1) / (2 k'), j = 0..k'-1, of the sorted values with
    k' = min(k, number of distinct values); if repeated values make two of them equal, the same
    quantiles of the distinct values are used instead (strictly increasing). Each iteration
    assigns every value to its nearest centroid (ties: the lower one) and moves every centroid to
    the mean of its values (an empty cluster keeps its centroid), until the assignment no longer
    changes or ``iterations`` is reached.

    Fewer clusters, gracefully: with fewer than k distinct values only k' clusters are formed,
    and a cluster that ends up empty is dropped, so ``centroids`` may be shorter than k.

    Returns (labels, centroids): labels[i] in [0, len(centroids)) for values[i]; centroids
    strictly ascending, so label 0 is the lowest cluster. Raises ValueError for an empty or
    non-finite ``values`` (must be 1-D) or k, iterations < 1.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite (no NaN or inf)")
    k = _positive_int(k, "k")
    iterations = _positive_int(iterations, "iterations")
    distinct = np.unique(x)
    clusters = min(k, len(distinct))
    levels = (2 * np.arange(clusters) + 1) / (2 * clusters)
    centroids = np.quantile(np.sort(x), levels)
    if len(np.unique(centroids)) < clusters:
        centroids = np.quantile(distinct, levels)
    labels = np.full(x.size, -1)
    for _ in range(iterations):
        new_labels = np.argmin(np.abs(x[:, None] - centroids[None, :]), axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for j in range(clusters):
            members = x[labels == j]
            if members.size:
                centroids[j] = members.mean()
    used = np.unique(labels)
    centroids = centroids[used]
    order = np.argsort(centroids, kind="stable")
    relabel = np.empty(len(used), dtype=np.int64)
    relabel[order] = np.arange(len(used))
    position = np.searchsorted(used, labels)
    return relabel[position], centroids[order]


def fisher_probabilities(
    scores: np.ndarray, cluster_probabilities: Sequence[float] = FIM_CLUSTER_PROBABILITIES
) -> np.ndarray:
    """FIM-HLA's per-layer probabilities from the layer scores.

    k = len(``cluster_probabilities``) clusters of the scores by :func:`kmeans_1d`, sorted by
    centroid from low to high score [choice: the authors' cluster ids are unsorted]; layer l in
    cluster j gets q_j = cluster_probabilities[j] (default 1/27, 2/27, 1/9 [code]) and

        p_l = q_{cluster(l)} / sum_m q_{cluster(m)}.

    If the scores form only k' < k clusters (fewer distinct scores), sorted cluster j gets
    cluster_probabilities[round(j (k - 1) / (k' - 1))] - the lowest keeps the lowest probability,
    the highest the highest; with k' = 1 (all scores equal) p is uniform.

    Raises ValueError for empty or non-finite scores or non-positive cluster probabilities.
    """
    q = np.asarray(cluster_probabilities, dtype=np.float64)
    if q.ndim != 1 or q.size == 0:
        raise ValueError("cluster_probabilities must be a non-empty sequence of numbers")
    if not np.all(np.isfinite(q)) or np.any(q <= 0):
        raise ValueError(f"cluster_probabilities must be positive and finite, got {q.tolist()}")
    labels, centroids = kmeans_1d(np.asarray(scores), k=len(q))
    found = len(centroids)
    if found == 1:
        mapped = q[-1:]
    else:
        mapped = q[np.rint(np.arange(found) * (len(q) - 1) / (found - 1)).astype(int)]
    weights = mapped[labels]
    return weights / weights.sum()


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _budget(value: object, num_layers: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer number of layers, got {value!r}")
    if not 1 <= value <= num_layers:
        raise ValueError(f"{name} = {value} is outside [1, {num_layers}] (the number of layers)")
    return int(value)


def _check_probabilities(probabilities: np.ndarray) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probabilities must be a non-empty 1-D array, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probabilities must be finite and non-negative")
    total = float(p.sum())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"probabilities must sum to 1, got {total:.8g}")
    return p / total


# --------------------------------------------------------------------------------------------
# FedRA
# --------------------------------------------------------------------------------------------


def allocation_matrix(
    rng: np.random.Generator, budgets: Sequence[int], num_layers: int, cover: bool = False
) -> np.ndarray:
    """FedRA's random allocation matrix M (clients x layers, bool): row c holds ``budgets[c]``
    distinct layers, M[c, l] = 1 when client c trains layer l this round.

    Su, Li and Xue, "FedRA: A Random Allocation Strategy for Federated Tuning to Unleash the
    Power of Heterogeneous Clients", ECCV 2024 (arXiv 2311.11227). A budget of L gives a full
    row and draws nothing.

    - ``cover=False`` [code]: each row with K_c < L is a uniformly random K_c-subset, drawn in
      the order of ``budgets`` as :func:`sample_layers` with the uniform p draws it (the authors'
      ``np.random.choice(L, K_c, replace=False)`` per client). This is RGD-HLA's draw with the
      uniform pattern: the same rows from the same generator. A layer may be left to nobody.
    - ``cover=True`` [choice; the authors' code has a disabled repair loop for it]: a random
      order of the clients and a random permutation of the layers; each client in turn takes the
      next min(K_c, left) layers of the permutation that nobody has yet, then fills the rest of
      its budget with a uniform draw among the layers it does not hold. Every layer is covered
      when sum K_c >= L; otherwise sum K_c distinct layers are, the most the budgets allow. The
      procedure treats every layer alike, so each row is still a uniformly random K_c-subset;
      only the rows' joint law changes (they avoid each other while layers are uncovered).

    Raises ValueError for an empty budget list or a budget outside [1, L].
    """
    num_layers = _positive_int(num_layers, "num_layers")
    checked = [_budget(b, num_layers, f"budgets[{c}]") for c, b in enumerate(budgets)]
    if not checked:
        raise ValueError("budgets is empty: expected at least one client budget")
    matrix = np.zeros((len(checked), num_layers), dtype=bool)
    if not cover:
        uniform = np.full(num_layers, 1.0 / num_layers)
        for client, budget in enumerate(checked):
            if budget == num_layers:
                matrix[client] = True
            else:
                matrix[client, sample_layers(rng, budget, uniform)] = True
        return matrix
    order = rng.permutation(len(checked))
    uncovered = rng.permutation(num_layers).tolist()
    for client in order.tolist():
        budget = checked[client]
        fresh, uncovered = uncovered[:budget], uncovered[budget:]
        matrix[client, fresh] = True
        if budget > len(fresh):
            others = np.flatnonzero(~matrix[client])
            matrix[client, rng.choice(others, budget - len(fresh), replace=False)] = True
    return matrix
