"""The model the ServerApp holds, lent to strategies that compute on the server.

Central evaluation uses it every round; HeLoRA-KD trains its group models on the public split
with it. It is the same frozen base model and :class:`~hetfed.adapters.AdapterHost` the clients
use, built once in the ServerApp process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hetfed.adapters import AdapterHost, LoraSpec
from hetfed.config import RunSettings
from hetfed.data_config import TEST, VALIDATION
from hetfed.generation import Evaluation, evaluate_generation
from hetfed.models import GENERATION
from hetfed.training import Encoded, score


@dataclass
class ServerModel:
    settings: RunSettings
    host: AdapterHost
    test: Encoded
    public: Encoded | None  # the server split (``data.server-examples``), if any
    tokenizer: Any = None  # the generation task decodes with it
    references: list[str] | None = None  # the generation task's test targets
    validation: Encoded | None = None  # the validation split (``data.validation-examples``)
    validation_references: list[str] | None = None  # the generation task's validation targets

    @property
    def evaluated_split(self) -> str:
        """The split every round is evaluated on: validation when there is one (targets and
        best values are read on it; the test split then only for the final model), else test."""
        return TEST if self.validation is None else VALIDATION

    def load(
        self,
        spec: LoraSpec,
        state: dict[str, np.ndarray],
        base_deltas: dict[str, np.ndarray] | None = None,
    ):
        """Activate ``spec``'s adapter with ``state`` on the base model changed by the deltas."""
        with self.host.lock:
            model = self.host.set_state(spec, state)
            self.host.set_base_deltas(base_deltas or {})
            return model

    def evaluate(
        self,
        spec: LoraSpec,
        state: dict[str, np.ndarray],
        base_deltas: dict[str, np.ndarray] | None = None,
        split: str = TEST,
    ) -> Evaluation:
        """The global model on ``split`` (test or validation): accuracy and loss; for the
        generation task also ROUGE-L, perplexity and the generations (:mod:`hetfed.generation`)."""
        data, references = (
            (self.test, self.references)
            if split == TEST
            else (self.validation, self.validation_references)
        )
        if data is None:
            raise ValueError(f"no {split} split to evaluate on")
        batch, precision = self.settings.train.eval_batch_size, self.settings.train.precision
        with self.host.lock:
            model = self.load(spec, state, base_deltas)
            if self.settings.model.task == GENERATION:
                max_new = self.settings.model.max_new_tokens
                return evaluate_generation(
                    model, data, self.tokenizer, references, max_new, batch, precision
                )
            return Evaluation.of(score(model, data, batch, precision))
