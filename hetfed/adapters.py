"""LoRA adapters over peft on one shared frozen base model.

An :class:`AdapterHost` wraps the process's base model once with peft and then keeps one named
peft adapter per :class:`LoraSpec` (rank, alpha, target modules). Switching a client means
activating the adapter of its spec and loading the client's arrays into it: the base model is
never copied. Adapter state travels as named numpy arrays whose names are peft's own state-dict
keys (``...query.lora_A.weight``, ``...classifier.weight``), so an exported global adapter is a
standard PEFT folder. A classifier's head (``classifier``) is trained in full alongside LoRA; a
causal LM has no head to train.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from hetfed.adapter_state import LORA_A, LORA_B, layer_of
from hetfed.scaling import lora_scaling

HEAD_MODULES = ("classifier",)


@dataclass(frozen=True)
class LoraSpec:
    """The shape of one client's adapter: its rank, scaling numerator and targeted modules.

    Its scaling is peft's: alpha / rank, or alpha / sqrt(rank) with ``rslora``. A ``slot`` gives
    the adapter a name of its own, for one of the clients a packed trainer trains side by side.
    """

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    rslora: bool = False
    slot: int | None = None

    @property
    def name(self) -> str:
        dropout = f"-d{self.dropout:g}".replace(".", "p") if self.dropout else ""  # no dots
        slot = "" if self.slot is None else f"-slot{self.slot}"
        return f"r{self.rank}-a{self.alpha:g}" + ("-rs" if self.rslora else "") + dropout + slot

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)

    def peft_config(self, base_model_name: str, head_modules: Iterable[str]) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            use_rslora=self.rslora,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            modules_to_save=list(head_modules) or None,
            base_model_name_or_path=base_model_name or None,
        )


def _factor_parameters(
    spec: LoraSpec, modules: Iterable[nn.Module], factors: Iterable[str]
) -> list[nn.Parameter]:
    """The parameters of the named factors of ``spec``'s adapter in ``modules``."""
    factors = list(factors)
    return [
        parameter
        for module in modules
        for factor in factors
        for parameter in getattr(module, factor)[spec.name].parameters()
    ]


def _adapter_state(model: PeftModel, spec: LoraSpec) -> dict[str, torch.Tensor]:
    # save_embedding_layers=False: LoRA never resizes the embeddings, and peft's "auto" would
    # read the base model's config (from disk or the Hub) on every call to check that it did not
    return get_peft_model_state_dict(model, adapter_name=spec.name, save_embedding_layers=False)


@contextmanager
def _frozen(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """No gradient for ``parameters`` inside the block; the ones that were trainable are made
    trainable again afterwards (the next client of this process trains them)."""
    frozen = [parameter for parameter in parameters if parameter.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


class AdapterHost:
    """One frozen base model carrying any number of named LoRA adapters.

    Thread-safe for the ClientApp's use: a call activates its adapter and holds ``lock`` while it
    loads, trains and reads the adapter.
    """

    def __init__(self, base_model: nn.Module) -> None:
        self.base_model = base_model
        # peft records it in adapter_config.json (build_classifier sets a local folder if any)
        self.base_model_name = getattr(base_model, "name_or_path", "")
        self.head_modules = [name for name in HEAD_MODULES if hasattr(base_model, name)]
        self.peft_model: PeftModel | None = None
        self.lock = threading.RLock()
        # Pristine copies of the base weights that a delta has changed (only those modules).
        self._pristine: dict[str, torch.Tensor] = {}

    def activate(self, spec: LoraSpec, seed: int = 0) -> PeftModel:
        """Make ``spec``'s adapter the active one, creating it (seeded) on first use."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if self.peft_model is None:
                self.peft_model = get_peft_model(
                    self.base_model, self._peft_config(spec), adapter_name=spec.name
                )
            elif spec.name not in self.peft_model.peft_config:
                self.peft_model.add_adapter(spec.name, self._peft_config(spec))
        self.peft_model.set_adapter(spec.name)
        return self.peft_model

    def train_together(self, specs: Iterable[LoraSpec]) -> PeftModel:
        """Make the (loaded) adapters of ``specs`` trainable at once, for a packed forward pass
        that names each row's adapter (activating one adapter freezes the others)."""
        if self.peft_model is None:
            raise RuntimeError("load the adapters (set_state) before training them together")
        self.peft_model.set_requires_grad([spec.name for spec in specs], True)
        return self.peft_model

    def _peft_config(self, spec: LoraSpec) -> LoraConfig:
        return spec.peft_config(self.base_model_name, self.head_modules)

    def get_state(self, spec: LoraSpec) -> dict[str, np.ndarray]:
        """The adapter's trainable arrays (LoRA factors and head) as float32 numpy arrays."""
        model = self.activate(spec)
        state = _adapter_state(model, spec)
        return {k: v.detach().cpu().float().numpy().copy() for k, v in state.items()}

    def set_state(self, spec: LoraSpec, state: dict[str, np.ndarray]) -> PeftModel:
        """Load named arrays into ``spec``'s adapter; every key must exist with the right shape."""
        model = self.activate(spec)
        expected = _adapter_state(model, spec)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter {spec.name}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}"
            )
        tensors = {}
        for key, ref in expected.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise ValueError(
                    f"adapter {spec.name}: {key} has shape {state[key].shape}, "
                    f"expected {tuple(ref.shape)}"
                )
            tensors[key] = torch.as_tensor(np.asarray(state[key]), dtype=ref.dtype)
        set_peft_model_state_dict(model, tensors, adapter_name=spec.name)
        return model

    @contextmanager
    def train_only_layers(self, spec: LoraSpec, layers: Iterable[int] | None) -> Iterator[None]:
        """Freeze the LoRA modules of ``spec``'s adapter outside ``layers`` (all if None).

        A module belongs to the block whose index matches exactly
        (:func:`hetfed.adapter_state.layer_of`). The frozen modules still act in the forward pass
        with the values the client received.
        """
        outside = []
        if layers is not None:
            keep = set(layers)
            outside = [m for name, m in self._lora_modules(spec) if layer_of(name) not in keep]
        with _frozen(_factor_parameters(spec, outside, (LORA_A, LORA_B))):
            yield

    @contextmanager
    def frozen_factors(self, spec: LoraSpec, factors: Iterable[str]) -> Iterator[None]:
        """Keep the named factors (``lora_A``, ``lora_B``) of every LoRA module of ``spec``'s
        adapter fixed while training: they act in the forward pass but get no update, so they
        come back bit for bit as they were loaded (FFA-LoRA's frozen A)."""
        factors = list(factors)
        unknown = sorted(set(factors) - {LORA_A, LORA_B})
        if unknown:
            raise ValueError(f"cannot freeze LoRA factors {unknown}; allowed: {LORA_A}, {LORA_B}")
        modules = [module for _, module in self._lora_modules(spec)] if factors else []
        with _frozen(_factor_parameters(spec, modules, factors)):
            yield

    def built_scaling(self, spec: LoraSpec) -> set[float]:
        """The scalings peft gave ``spec``'s (loaded) adapter in its LoRA modules."""
        return {float(module.scaling[spec.name]) for _, module in self._lora_modules(spec)}

    def _lora_modules(self, spec: LoraSpec) -> list[tuple[str, nn.Module]]:
        """(name, module) of every module that carries ``spec``'s (loaded) adapter.

        It does not activate the adapter: peft's ``set_adapter`` makes every factor of the
        active adapter trainable again, which would undo a freeze already in place.
        """
        if self.peft_model is None or spec.name not in self.peft_model.peft_config:
            raise RuntimeError(f"load adapter {spec.name} (set_state) before freezing parts of it")
        return [
            (name, module)
            for name, module in self.peft_model.named_modules()
            if spec.name in getattr(module, LORA_A, {})
        ]

    def set_base_deltas(self, deltas: dict[str, np.ndarray]) -> None:
        """Make each LoRA-wrapped module's base weight ``W0 + delta`` (``W0`` where none given).

        Names are the modules' peft names (as in the adapter's state-dict keys). Only modules
        that ever received a delta keep a pristine copy of their weight, once per process.
        """
        if self.peft_model is None:
            raise RuntimeError("activate an adapter before setting base deltas")
        modules = dict(self.peft_model.named_modules())
        unknown = sorted(set(deltas) - set(modules))
        if unknown:
            raise ValueError(f"base deltas for unknown modules {unknown[:3]}")
        for name in set(deltas) | set(self._pristine):
            weight = modules[name].base_layer.weight
            if name not in self._pristine:
                self._pristine[name] = weight.detach().clone()
            pristine = self._pristine[name]
            with torch.no_grad():
                if name in deltas:
                    delta = torch.as_tensor(
                        np.asarray(deltas[name]), dtype=weight.dtype, device=weight.device
                    )
                    if delta.shape != weight.shape:
                        raise ValueError(
                            f"base delta of {name} has shape {tuple(delta.shape)},"
                            f" expected {tuple(weight.shape)}"
                        )
                    weight.copy_(pristine + delta)
                else:
                    weight.copy_(pristine)

    def initial_state(self, spec: LoraSpec, seed: int) -> dict[str, np.ndarray]:
        """A fresh adapter as peft initialises it: A random (seeded), B zero, head as built."""
        with self.lock:
            model = self.activate(spec, seed=seed)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                for module in model.modules():
                    if hasattr(module, "reset_lora_parameters") and spec.name in getattr(
                        module, "lora_A", {}
                    ):
                        module.reset_lora_parameters(spec.name, True)
            return self.get_state(spec)

    def export(
        self,
        spec: LoraSpec,
        state: dict[str, np.ndarray],
        folder: str | Path,
        extra: dict | None = None,
    ) -> Path:
        """Write ``state`` as a standard PEFT folder that ``PeftModel.from_pretrained`` loads.

        It needs no earlier use of the host: a resumed run exports straight from a checkpoint.
        """
        folder = Path(folder)
        with self.lock:
            model = self.set_state(spec, state)
            # The folder's adapter is relative to the pristine base: leave the host holding
            # exactly the exported model (set_state activated it, so on a fresh host too).
            self.set_base_deltas({})
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(
                    tmp, selected_adapters=[spec.name], save_embedding_layers=False
                )
                saved = Path(tmp) / spec.name  # peft nests non-default adapter names
                if folder.exists():
                    shutil.rmtree(folder)
                shutil.copytree(saved, folder)
        if extra:
            (folder / "hetfed.json").write_text(json.dumps(extra, indent=2))
        return folder
