"""Everything checked before a run trains: the strategy, the run config, profiles, ranks, data.

The ServerApp calls :func:`plan_run` first; ``hetfed check`` calls it on a scenario folder
without starting Flower. Nothing here loads model weights; the instruction task loads the
tokenizer and the label names to check that the prompt fits. A run that resumes has its
checkpoint read and matched against the run config here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetfed.budgets import (
    Budget,
    check_affordable_ranks,
    check_deadline_speeds,
    derive_budgets,
    local_update,
)
from hetfed.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    check_resumable,
    load_checkpoint,
    resume_folder,
)
from hetfed.config import RunSettings, Scalar, parse_run_config, require_runs_on
from hetfed.data import load_splits
from hetfed.data_sources import resolve_source
from hetfed.device_clock import DeviceClock
from hetfed.errors import ConfigError
from hetfed.instructions import generation_layout, prompt_layout
from hetfed.models import (
    CAUSAL_TASKS,
    GENERATION,
    INSTRUCTION,
    compute_device,
    cost_shape,
    load_model_config,
    load_tokenizer,
    max_lora_rank,
)
from hetfed.profiles import AUTO, DeviceProfiles, load_profiles
from strategies.registry import load_strategy


@dataclass(frozen=True)
class RunPlan:
    settings: RunSettings
    options: Any
    strategy_class: type
    profiles: DeviceProfiles
    max_rank: int
    num_layers: int
    clock: DeviceClock  # the simulated device clock of this model and local work
    budgets: list[Budget]  # what every tier affords and what it costs (derived ones included)
    derived_tiers: tuple[str, ...]  # the tiers whose rank or layers were "auto"
    resume_from: Path | None = None  # the folder named by ``resume``
    checkpoint: Checkpoint | None = None  # what the run continues from (None: round 1)

    def build_strategy(self):
        strategy = self.strategy_class(self.settings, self.profiles, self.options, self.num_layers)
        strategy.clock = self.clock
        return strategy


def plan_run(run_config: Mapping[str, Scalar], project_dir: str | Path | None = None) -> RunPlan:
    """Validate a run config completely; raise :class:`ConfigError` on the first problem.

    ``profiles`` is resolved against ``project_dir`` (the scenario folder) when it is relative.
    """
    strategy_name = run_config.get("strategy", RunSettings.strategy)
    strategy_class = load_strategy(str(strategy_name))
    settings, options = parse_run_config(
        run_config, strategy_class.options_class, options_prefix=strategy_name
    )
    if settings.model.task not in strategy_class.tasks:
        raise ConfigError(
            "model.task",
            settings.model.task,
            f"{' or '.join(strategy_class.tasks)}: {strategy_name} supports only these",
        )
    require_runs_on(settings, compute_device())  # the server evaluates on this process's device
    profiles_path = Path(settings.profiles)
    if not profiles_path.is_absolute() and project_dir is not None:
        profiles_path = Path(project_dir) / profiles_path
    profiles = load_profiles(profiles_path)
    resolve_source(settings.data.source)
    limit = max_lora_rank(settings.model, settings.lora.modules())
    for tier in profiles.tiers.values():
        if tier.rank != AUTO and tier.rank > limit:
            raise ConfigError(
                f"tiers.{tier.name}.rank",
                tier.rank,
                f"an integer in [1, {limit}] (min(d_in, d_out) of "
                f"{settings.lora.target_modules} in {settings.model.name})",
                profiles.source,
            )
    num_layers = load_model_config(settings.model).num_hidden_layers
    for tier in profiles.tiers.values():
        if isinstance(tier.layers, int) and tier.layers > num_layers:
            raise ConfigError(
                f"tiers.{tier.name}.layers",
                tier.layers,
                f"an integer in [1, {num_layers}] ({settings.model.name} has "
                f"{num_layers} layers) or a fraction in (0, 1]",
                profiles.source,
            )
    task = settings.model.task
    data = settings.data
    if task == GENERATION and not data.pairs:
        raise ConfigError(
            "data.target-column",
            data.target_column,
            "a column of target texts (or data.source = 'bbc-news-headlines') for "
            "model.task = 'generation'",
        )
    if task != GENERATION and data.pairs:
        key, value = (
            ("data.target-column", data.target_column)
            if data.target_column
            else ("data.source", data.source)
        )
        raise ConfigError(key, value, f"no target texts for model.task = {task!r}")
    splits = load_splits(settings.data)
    label_names = splits.label_names
    scored = 1  # positions whose logits a causal LM computes: the longest answer and one before
    model = settings.model
    if task == INSTRUCTION:
        tokenizer = load_tokenizer(model.name)
        _, _, answers, _ = prompt_layout(tokenizer, label_names, model.max_length, model.prompt)
        scored += max(len(a) for a in answers)
    elif task == GENERATION:
        generation_layout(
            load_tokenizer(model.name), model.max_length, model.prompt, model.max_new_tokens
        )
        scored += model.max_new_tokens
    clock = device_clock(settings, len(label_names), scored)
    check_deadline_speeds(settings.round_deadline, profiles)
    classifier = (clock.shape.hidden + 1) * len(label_names)  # a classifier's weight and bias
    head_bytes = 0 if task in CAUSAL_TASKS else 4 * classifier
    derived_tiers = tuple(t.name for t in profiles.auto)
    profiles, budgets = derive_budgets(profiles, clock, limit, head_bytes)
    resume_from = resume_folder(settings.resume, settings.results_dir)
    checkpoint = load_checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        check_resumable(checkpoint, run_config, resume_from)
        if settings.num_server_rounds < checkpoint.server_round:
            raise ConfigError(
                "num-server-rounds",
                settings.num_server_rounds,
                f"an integer >= {checkpoint.server_round}, the rounds the checkpoint already holds",
                str(resume_from / CHECKPOINT_FILE),
            )
    plan = RunPlan(
        settings,
        options,
        strategy_class,
        profiles,
        limit,
        num_layers,
        clock,
        budgets,
        derived_tiers,
        resume_from,
        checkpoint,
    )
    strategy = plan.build_strategy()
    rank = strategy.global_rank()
    if not 1 <= rank <= limit:
        raise ConfigError(f"{strategy_name}.rank", rank, f"an integer in [1, {limit}]")
    check_affordable_ranks(strategy.rank_policy.client_rank, profiles, f"{strategy_name}.rank")
    return plan


def device_clock(settings: RunSettings, num_labels: int, scored: int) -> DeviceClock:
    """The simulated clock of the run's model and local work (:mod:`hetfed.device_clock`)."""
    work = local_update(settings, rank=1, blocks=(), scored=scored)
    return DeviceClock(
        cost_shape(settings.model, num_labels),
        work,
        settings.compute_efficiency,
        settings.round_deadline,
        settings.straggler_policy,
    )
