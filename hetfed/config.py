"""Run configuration: typed sections parsed from Flower's flat run config, strictly.

A scenario's ``[tool.flwr.app.config]`` is flattened by Flower into keys such as
``model.name`` or ``train.local-steps``. Each section is a frozen dataclass whose fields map to
keys ``<section>.<field-with-dashes>``; top-level keys map to :class:`RunSettings` fields. Every
key must be known, every value must have the field's type, and each dataclass checks its own
ranges in ``__post_init__``. Errors name the key, the value and what is allowed, and are raised
before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hetfed.data_config import TEST, VALIDATION, DataConfig
from hetfed.errors import ConfigError
from hetfed.models import ModelConfig, require_base_runs
from hetfed.scaling import SCALING_RULES
from hetfed.training import TrainConfig, require_precision_runs

Scalar = bool | int | float | str


@dataclass(frozen=True)
class LoraSettings:
    """Which modules carry LoRA and how updates are scaled across ranks (:mod:`hetfed.scaling`).

    ``scaling``: the rule s(r) of a rank-r adapter (``standard`` alpha / r, ``rslora``
    alpha / sqrt(r), ``fixed`` alpha / r_max); ``rescale``: convert B between a client's scaling
    and the global one both ways (false: the authors' codes, unconverted, as an ablation).
    """

    target_modules: str = "query,value"
    alpha: float = 16.0
    dropout: float = 0.0
    scaling: str = "standard"
    rescale: bool = True

    def __post_init__(self) -> None:
        if not self.modules():
            raise ConfigError(
                "lora.target-modules",
                self.target_modules,
                "a comma-separated list of module names, e.g. 'query,value'",
            )
        if self.alpha <= 0:
            raise ConfigError("lora.alpha", self.alpha, "a number > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError("lora.dropout", self.dropout, "a number in [0, 1)")
        if self.scaling not in SCALING_RULES:
            raise ConfigError("lora.scaling", self.scaling, " | ".join(SCALING_RULES))

    def modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.target_modules.split(",") if m.strip())


FAULT_KINDS = ("raise", "timeout", "nan", "shape", "missing-key")


@dataclass(frozen=True)
class FaultSettings:
    """Failure injection, for testing a run under faults: each round the server picks
    ``round(fraction * sampled)`` clients (seeded) and tells each to misbehave in one of
    ``kinds``: raise an exception, reply after the round timeout, or reply with garbage (a NaN,
    a wrong shape, a missing array)."""

    fraction: float = 0.0
    kinds: str = ",".join(FAULT_KINDS)

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ConfigError("faults.fraction", self.fraction, "a number in [0, 1]")
        unknown = [k for k in self.kind_list() if k not in FAULT_KINDS]
        if unknown or not self.kind_list():
            raise ConfigError(
                "faults.kinds", self.kinds, f"a comma-separated list of {', '.join(FAULT_KINDS)}"
            )

    def kind_list(self) -> list[str]:
        return [k.strip() for k in self.kinds.split(",") if k.strip()]


DATA_SEED = "data.seed"
PACKING_OFF, PACKING_AUTO = "off", "auto"


@dataclass(frozen=True)
class SimulationSettings:
    """How simulated clients train (deployment ignores this: one device, one client).

    ``packing``: ``off``, each ClientApp trains on its own copy of the base; ``auto`` or a
    number k, the ClientApps hand their training to one packed trainer per device, which holds
    the base once and trains up to k clients (``auto``: as many as its free memory holds, by the
    cost model) in one batched forward and backward pass (:mod:`hetfed.packed_training`).
    """

    packing: str | int = PACKING_OFF

    def __post_init__(self) -> None:
        if isinstance(self.packing, int) and not isinstance(self.packing, bool):
            if self.packing >= 1:
                return
        if self.packing not in (PACKING_OFF, PACKING_AUTO):
            raise ConfigError("simulation.packing", self.packing, "off, auto or an integer k >= 1")

    @property
    def packed(self) -> bool:
        return self.packing != PACKING_OFF


TOO_FEW_REPLIES = ("retry", "skip")
STRAGGLER_POLICIES = ("drop", "partial")


@dataclass(frozen=True)
class RunSettings:
    """Everything a run is configured with; one instance per ServerApp and ClientApp."""

    strategy: str = "hetlora"
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    # federated evaluation: the share of clients that evaluate the new global model on their own
    # held-out splits (data.local-test-fraction, data.local-validation-fraction) after each round
    # (0: central evaluation only)
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 600.0
    min_train_replies: int = 1  # valid replies a round needs to update the global adapter
    too_few_replies: str = "retry"  # what a round below min-train-replies does: retry or skip
    max_retries: int = 2  # attempts after the first, with a fresh sample, before a skip
    max_update_norm: float = 0.0  # reject a reply whose ||reply - sent||_F is larger (0: off)
    round_deadline: float = 0.0  # simulated seconds a round waits for a client (0: none)
    straggler_policy: str = "drop"  # a client that would miss the deadline: drop | partial
    compute_efficiency: float = 0.5  # share of a tier's compute-gflops that training sustains
    resume: bool | str = False  # true: continue from results-dir's checkpoint; or a folder
    seed: int = 42
    # the last rounds whose global model is also scored on the test split (report only: the
    # mean over them, summary.json's last_rounds_accuracy, smooths a round's swing)
    test_rounds: int = 1
    profiles: str = "profiles.yaml"
    results_dir: str = "results"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    faults: FaultSettings = field(default_factory=FaultSettings)
    simulation: SimulationSettings = field(default_factory=SimulationSettings)

    @property
    def client_split(self) -> str:
        """The split federated evaluation scores every round on: each client's validation split
        when it holds one (``data.local-validation-fraction``), else its test split."""
        return VALIDATION if self.data.local_validation_fraction > 0 else TEST

    def scores_test(self, server_round: int) -> bool:
        """Whether ``server_round``'s global model is also scored on the test split (centrally,
        and by the evaluating clients on theirs): the last ``test-rounds`` rounds only."""
        return server_round > self.num_server_rounds - self.test_rounds

    def client_splits(self, server_round: int) -> tuple[str, ...]:
        """The held-out splits an evaluating client scores in ``server_round``: its
        :attr:`client_split`, and its test split too where that is validation and the round is
        one of the last ``test-rounds``."""
        if self.client_split == VALIDATION and self.scores_test(server_round):
            return (VALIDATION, TEST)
        return (self.client_split,)

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1:
            raise ConfigError("num-server-rounds", self.num_server_rounds, "an integer >= 1")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError("fraction-train", self.fraction_train, "a number in (0, 1]")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError("fraction-evaluate", self.fraction_evaluate, "a number in [0, 1]")
        local = self.data.local_test_fraction
        if self.fraction_evaluate > 0 and local == 0:
            raise ConfigError(
                "data.local-test-fraction",
                local,
                f"a number in (0, 1): fraction-evaluate {self.fraction_evaluate} evaluates on "
                "each client's local test split",
            )
        held_out = {
            "data.local-test-fraction": local,
            "data.local-validation-fraction": self.data.local_validation_fraction,
        }
        for key, fraction in held_out.items():
            if fraction > 0 and self.fraction_evaluate == 0:
                raise ConfigError(
                    "fraction-evaluate",
                    self.fraction_evaluate,
                    f"a number in (0, 1]: {key} {fraction} holds out a local split that only "
                    "federated evaluation reads",
                )
        if self.min_train_nodes < 1:
            raise ConfigError("min-train-nodes", self.min_train_nodes, "an integer >= 1")
        if self.min_available_nodes < self.min_train_nodes:
            raise ConfigError(
                "min-available-nodes",
                self.min_available_nodes,
                f"an integer >= min-train-nodes ({self.min_train_nodes})",
            )
        if self.round_timeout <= 0:
            raise ConfigError("round-timeout", self.round_timeout, "seconds > 0")
        if not 1 <= self.min_train_replies <= self.min_available_nodes:
            raise ConfigError(
                "min-train-replies",
                self.min_train_replies,
                f"an integer in [1, min-available-nodes ({self.min_available_nodes})]",
            )
        if self.too_few_replies not in TOO_FEW_REPLIES:
            raise ConfigError("too-few-replies", self.too_few_replies, " or ".join(TOO_FEW_REPLIES))
        if self.max_retries < 0:
            raise ConfigError("max-retries", self.max_retries, "an integer >= 0")
        if self.max_update_norm < 0:
            raise ConfigError("max-update-norm", self.max_update_norm, "a number >= 0 (0: off)")
        if self.round_deadline < 0:
            raise ConfigError("round-deadline", self.round_deadline, "simulated seconds >= 0")
        if self.straggler_policy not in STRAGGLER_POLICIES:
            raise ConfigError(
                "straggler-policy", self.straggler_policy, " or ".join(STRAGGLER_POLICIES)
            )
        if not 0 < self.compute_efficiency <= 1:
            raise ConfigError("compute-efficiency", self.compute_efficiency, "a number in (0, 1]")
        if self.seed < 0:
            raise ConfigError("seed", self.seed, "an integer >= 0")
        if not 1 <= self.test_rounds <= self.num_server_rounds:
            raise ConfigError(
                "test-rounds",
                self.test_rounds,
                f"an integer in [1, num-server-rounds ({self.num_server_rounds})]",
            )
        if self.resume == "":
            raise ConfigError("resume", self.resume, "true, false or a results folder")
        if self.simulation.packed and self.train.base_dropout:
            raise ConfigError(
                "train.base-dropout",
                self.train.base_dropout,
                f"false with simulation.packing = {self.simulation.packing!r}: packed clients "
                "share one forward pass over the base, whose dropout draws cannot be each "
                "client's own (docs/packing.md)",
            )


def require_runs_on(settings: RunSettings, device: torch.device) -> None:
    """Refuse, before anything loads, a run this device cannot compute: its base model's dtype
    and quantization (:func:`~hetfed.models.require_base_runs`) and the precision of training
    and evaluation (:func:`~hetfed.training.require_precision_runs`)."""
    require_base_runs(settings.model, device)
    require_precision_runs(settings.train, device)


def config_key(prefix: str, field_name: str) -> str:
    """Run-config key of a dataclass field: ``train`` + ``local_steps`` -> ``train.local-steps``."""
    name = field_name.replace("_", "-")
    return f"{prefix}.{name}" if prefix else name


def setting(settings: Any, key: str) -> Any:
    """The value of a run-config ``key`` in parsed settings: ``lora.rescale`` is
    ``settings.lora.rescale``."""
    value = settings
    for part in key.split("."):
        value = getattr(value, part.replace("-", "_"))
    return value


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check a TOML value against a field type; ints are accepted where a float is expected."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    allowed = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, tp):
        raise ConfigError(key, value, _type_name(tp))
    return value


def _section_types(cls: type) -> dict[str, Any]:
    """The run-config fields of ``cls``: a field named with a leading underscore is not a key."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return {f.name: hints[f.name] for f in fields if f.init and not f.name.startswith("_")}


def build_section(cls: type, prefix: str, flat: Mapping[str, Scalar], used: set[str]) -> Any:
    """Build dataclass ``cls`` from the keys under ``prefix``; nested dataclasses recurse.

    Keys that were consumed are added to ``used`` so the caller can reject the rest.
    """
    kwargs: dict[str, Any] = {}
    for name, tp in _section_types(cls).items():
        key = config_key(prefix, name)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, key, flat, used)
        elif key in flat:
            used.add(key)
            kwargs[name] = _coerce(key, flat[key], tp)
    return cls(**kwargs)


def known_keys(cls: type, prefix: str = "") -> list[str]:
    """Every run-config key that ``cls`` (and its nested sections) accepts."""
    keys = []
    for name, tp in _section_types(cls).items():
        key = config_key(prefix, name)
        keys.extend(known_keys(tp, key) if dataclasses.is_dataclass(tp) else [key])
    return keys


def parse_run_config(
    run_config: Mapping[str, Scalar],
    strategy_options: type | None = None,
    options_prefix: str = "",
    strict: bool = True,
) -> tuple[RunSettings, Any]:
    """Parse Flower's flat run config into :class:`RunSettings` and the strategy's options.

    With ``strict`` (the server), a key that neither the core sections nor the chosen strategy's
    options accept is an error, so a typo never goes unnoticed. Clients parse with
    ``strict=False`` because strategy options are the server's business.
    """
    used: set[str] = set()
    settings = build_section(RunSettings, "", run_config, used)
    if DATA_SEED not in run_config:  # a seed varies the data too, unless the run pins data.seed
        settings = dataclasses.replace(
            settings, data=dataclasses.replace(settings.data, seed=settings.seed)
        )
    options = None
    if strategy_options is not None:
        options = build_section(strategy_options, options_prefix, run_config, used)
    if strict:
        unknown = sorted(set(run_config) - used)
        if unknown:
            allowed = known_keys(RunSettings)
            if strategy_options is not None:
                allowed += known_keys(strategy_options, options_prefix)
            raise ConfigError(
                unknown[0],
                run_config[unknown[0]],
                f"one of the known keys: {', '.join(sorted(allowed))}",
            )
    return settings, options
