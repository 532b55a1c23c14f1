"""Item 5: the time of local training steps in float32 against bf16, on this machine's device:
``train.precision = "bf16"`` (autocast) and a bfloat16 base (``model.dtype = "bfloat16"``)
against float32, for each model, on the same data, adapter and seed, the variants alternated."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.config import RunSettings, parse_run_config
from hetfed.data import load_splits
from hetfed.models import cached_model, compute_device
from hetfed.training import encode_split, train_steps
from tooling import scenarios
from tooling.bench.common import isolated

RANK = 8  # the quickstart's largest tier
SMOLLM2_WORKLOAD = {  # scenarios/hetlora-smollm2's model on the scenario's data
    "model.name": "smollm2-135m-instruct",
    "model.task": "instruction",
    "model.prompt": "What is the topic of this news article? Answer with one of: {labels}.",
    "model.max-length": 64,
    "lora.target-modules": "q_proj,k_proj,v_proj,o_proj",
    "train.batch-size": 8,
}
# model -> run-config overrides of the bench scenario (the quickstart's MiniLM as it is)
PRECISION_WORKLOADS = {"all-MiniLM-L6-v2": {}, "smollm2-135m-instruct": SMOLLM2_WORKLOAD}
QUICK_PRECISION_WORKLOADS = {
    "tiny-random-bert": {"model.name": "tiny-random-bert"},
    "tiny-random-llama": {**SMOLLM2_WORKLOAD, "model.name": "tiny-random-llama"},
}


def precision_variants(settings: RunSettings) -> dict[str, RunSettings]:
    """The settings each variant trains with: float32, bf16 autocast, a bfloat16 base."""
    return {
        "fp32": settings,
        "bf16": replace(settings, train=replace(settings.train, precision="bf16")),
        "bf16 base": replace(settings, model=replace(settings.model, dtype="bfloat16")),
    }


def measure_precisions(
    run_config: Mapping[str, Any], steps: int, repeats: int, threads: int
) -> dict[str, Any]:
    """Seconds of ``steps`` local steps of each variant (:func:`precision_variants`), in this
    process with ``threads`` torch threads.

    Every call loads the same freshly initialised rank-8 adapter and trains the same examples
    (the first ``steps`` batches of the training split) with seed 0; one untimed step of each
    variant warms it up. The variants then run ``repeats`` times, in order and in reverse order
    by turns (fp32, bf16, bf16 base, bf16 base, bf16, fp32, ...), so a load that drifts weighs on
    all of them alike. Only :func:`hetfed.training.train_steps` is timed.
    """
    torch.set_num_threads(threads)
    settings, _ = parse_run_config(run_config, strict=False)
    splits = load_splits(settings.data)
    variants = precision_variants(settings)
    hosts, tokenizers = {}, {}  # one base model per model config: fp32 and bf16 autocast share
    for cfg in {variant.model for variant in variants.values()}:
        model, tokenizers[cfg] = cached_model(cfg, len(splits.label_names), settings.seed)
        hosts[cfg] = AdapterHost(model)
    spec = LoraSpec(RANK, settings.lora.alpha, settings.lora.modules())
    initial = hosts[settings.model].initial_state(spec, seed=settings.seed)
    examples = splits.train.select(range(min(len(splits.train), steps * settings.train.batch_size)))
    data = encode_split(settings.model, examples, splits.label_names, tokenizers[settings.model])

    def run(name: str, local_steps: int):
        variant = variants[name]
        model = hosts[variant.model].set_state(spec, initial)
        return train_steps(model, data, replace(variant.train, local_steps=local_steps), seed=0)

    for name in variants:
        run(name, 1)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    for repeat in range(repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            result = run(name, steps)
            seconds[name].append(result.seconds)
            losses[name] = result.loss
    median = {name: statistics.median(s) for name, s in seconds.items()}
    return {
        "model": settings.model.name,
        "task": settings.model.task,
        "device": str(compute_device()),
        "threads": threads,
        "batch_size": settings.train.batch_size,
        "max_length": settings.model.max_length,
        "rank": RANK,
        "steps": steps,
        "repeats": repeats,
        "variants": {
            name: {
                "seconds": seconds[name],
                "median_step_seconds": median[name] / steps,
                "train_loss": losses[name],
            }
            for name in variants
        },
        "bf16_over_fp32": median["bf16"] / median["fp32"],
        "bf16_base_over_fp32": median["bf16 base"] / median["fp32"],
    }


def training_precision(
    scenario: str | Path,
    workloads: Mapping[str, Mapping[str, Any]] = PRECISION_WORKLOADS,
    steps: int = 10,
    repeats: int = 3,
    threads: int = 1,
) -> dict[str, Any]:
    """bf16 against float32 training steps, per model: each workload (run-config overrides of
    the scenario) measured by :func:`measure_precisions` in a fresh process of its own.

    A time ratio below 1 means bf16 is faster; the train losses of the variants show that they
    did the same work (they differ by bf16's rounding only).
    """
    base = scenarios.scenario_run_config(scenario, [])
    return {
        "scenario": str(scenario),
        "models": [
            isolated(measure_precisions, {**base, **overrides}, steps, repeats, threads)
            for overrides in workloads.values()
        ],
    }
