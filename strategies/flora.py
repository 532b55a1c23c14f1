"""FLoRA: stack heterogeneous-rank updates, merge them into the base weights, restart LoRA.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024 (arXiv 2409.05976). See docs/methods/flora.md.

Per LoRA module, with p_k = n_k / sum(n) and client scaling s_k = alpha_k / r_k:

- Stack (:func:`hetfed.lora_algebra.stack`, weights p_k s_k on the A side):
  B_s = [B_1 | ... | B_K], A_s = [p_1 s_1 A_1; ...; p_K s_K A_K], so
  B_s A_s = sum_k p_k s_k B_k A_k exactly, whatever the ranks.
- Merge into the base weights: the global state carries a dense delta per module under
  ``<module>.base_layer.delta``; delta <- delta + B_s A_s, one matrix product added in place
  (:func:`hetfed.lora_algebra.add_stacked_product`). Clients train on W0 + delta.
- Restart: after every aggregation the global LoRA factors are re-initialised, A uniform in
  +-1/sqrt(d_in) (peft's kaiming-uniform with a = sqrt(5)) from
  :func:`hetfed.seeds.fresh_lora_rng`, B = 0; every client starts a fresh rank-r_k LoRA (the
  truncation of the fresh global one).
- Scaling alpha_k = 2 r_k (s_k = 2 for every client), as in the authors' code: one scaling, so
  hetfed's conversion between client and global scaling (:mod:`hetfed.scaling`) is the
  identity, and ``lora.scaling`` other than ``standard`` is refused.
- The task head is averaged with p_k (the base class).
"""

from __future__ import annotations

import numpy as np

from hetfed import adapter_state, seeds
from hetfed import lora_algebra as la
from hetfed.adapter_state import LoraPairs, State
from strategies.base import LoRAStrategy
from strategies.replies import ClientUpdate


def zero_deltas(lora: LoraPairs) -> State:
    """A zero float32 base-weight delta (d_out x d_in) for every LoRA module."""
    return {m: np.zeros((b.shape[0], a.shape[1]), np.float32) for m, (b, a) in lora.items()}


def fresh_lora(lora: LoraPairs, rng: np.random.Generator) -> LoraPairs:
    """New LoRA factors of the same shapes as peft initialises them: B = 0, A ~ U(+-1/sqrt(d_in)).

    peft uses ``kaiming_uniform_(A, a=sqrt(5))``, whose bound is 1/sqrt(fan_in) = 1/sqrt(d_in).
    Modules are drawn in sorted order so the result does not depend on dict order.
    """
    fresh = {}
    for module in sorted(lora):
        b, a = lora[module]
        bound = 1.0 / np.sqrt(a.shape[1])
        new_a = rng.uniform(-bound, bound, size=a.shape).astype(a.dtype)
        fresh[module] = (np.zeros_like(b), new_a)
    return fresh


class FLoRA(LoRAStrategy):
    """FLoRA (Wang et al., NeurIPS 2024): exact stacking merged into the base each round."""

    name = "flora"
    description = "FLoRA: stack the updates exactly, merge them into the base, fresh LoRA per round"
    requires = {
        "lora.scaling": ("standard", "it scales every client by 2 (alpha_k = 2 r_k)"),
        "model.quantize": ("none", "it merges the updates into the base weights"),
    }

    def client_alpha(self, rank: int) -> float:
        """alpha_k = 2 r_k (the authors' code), so every client's scaling is s_k = 2."""
        return 2.0 * rank

    def initial_state(self) -> State:
        """A fresh adapter at the global rank plus a zero base delta for every LoRA module.

        The deltas travel from round 1 on, so bytes down count what FLoRA sends: the merged
        weights of every LoRA module.
        """
        state = super().initial_state()
        return adapter_state.with_base_deltas(
            state, zero_deltas(adapter_state.split_state(state)[0])
        )

    def aggregate(
        self, server_round: int, updates: list[ClientUpdate], global_state: State
    ) -> State:
        """Merge the stacked updates into the deltas; fresh LoRA and p_k-averaged head."""
        merged = self.merged_deltas(updates, global_state)
        state = super().aggregate(server_round, updates, global_state)
        return adapter_state.with_base_deltas(adapter_state.trainable(state), merged)

    def merged_deltas(self, updates: list[ClientUpdate], global_state: State) -> State:
        """delta_m + B_s A_s per module m, with B_s A_s = sum_k p_k s_k B_k A_k (stacking)."""
        p = la.normalize_weights([u.num_examples for u in updates])
        weights = [pk * u.scaling for pk, u in zip(p, updates, strict=True)]
        lora = [u.lora for u in updates]
        global_lora = adapter_state.split_state(global_state)[0]
        old = {**zero_deltas(global_lora), **adapter_state.base_deltas(global_state)}
        merged = dict(old)  # deltas of modules without LoRA (none today) are kept
        for module in global_lora:
            merged[module] = la.add_stacked_product(
                old[module],
                [pairs[module][0] for pairs in lora],
                [pairs[module][1] for pairs in lora],
                weights,
            ).astype(old[module].dtype, copy=False)
        return merged

    def aggregate_lora(
        self, server_round: int, updates: list[ClientUpdate], global_lora: LoraPairs
    ) -> LoraPairs:
        """The merged update left nothing in the adapter: every client restarts from fresh LoRA."""
        return fresh_lora(global_lora, seeds.fresh_lora_rng(self.settings.seed, server_round))
