"""FedRA: a random allocation matrix of transformer blocks every round.

Su, Li and Xue, "FedRA: A Random Allocation Strategy for Federated Tuning to Unleash the Power
of Heterogeneous Clients", ECCV 2024 (arXiv 2311.11227); code https://github.com/leondada/FedRA.
See docs/methods/fedra.md and strategies/layer_base.py.

Every round (and retry attempt) the server draws one allocation matrix M (the round's clients x
L blocks) from its own seed stream (:func:`hetfed.seeds.fedra_allocation_rng`): client c's row
holds K_c distinct blocks, K_c its layer budget (:func:`hetfed.layer_allocation.
allocation_matrix`). The client trains LoRA only in its blocks; each block's adapter is averaged
over the clients that trained it and a block nobody trained keeps its value (the layer base).

- ``cover-all-layers = false`` (default) [code]: each row a uniformly random K_c-subset, drawn
  independently: RGD-HLA's draw with the uniform pattern, from another stream.
- ``cover-all-layers = true`` [choice]: the rows are drawn together so that every block is
  trained by someone whenever the budgets add up to L (each row still uniformly random).

Not reproduced: FedRA's client builds a shallower model of only its allocated blocks; a hetfed
client keeps every block in its forward pass, those outside its allocation frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hetfed import seeds
from hetfed.layer_allocation import allocation_matrix
from strategies.layer_base import LayerOptions, LayerStrategy


@dataclass(frozen=True)
class FedRAOptions(LayerOptions):
    """Options under ``fedra.``: cover-all-layers, weighting, ranks, rank, full-budget-only."""

    prefix: ClassVar[str] = "fedra"

    cover_all_layers: bool = False


class FedRA(LayerStrategy):
    """FedRA (Su et al., ECCV 2024): every round a random allocation matrix of blocks."""

    name = "fedra"
    description = "FedRA: each round a random allocation matrix gives each client K_c blocks"
    options_class = FedRAOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (round, attempt, clients) -> each client's blocks: the matrix is drawn once for all
        self._drawn: tuple[tuple, dict[int, list[int]]] | None = None

    def allocate(self, server_round: int, client_id: int, budget: int) -> list[int]:
        return self.allocation(server_round)[client_id]

    def allocation(self, server_round: int) -> dict[int, list[int]]:
        """Each training client's sorted blocks: the rows of this round's (and attempt's)
        allocation matrix over the clients training in it, in client-id order."""
        clients = self.round_clients()
        key = (server_round, self.round.attempt, tuple(clients))
        if self._drawn is None or self._drawn[0] != key:
            budgets = [self.layer_budget(c) or self.num_layers for c in clients]
            rng = seeds.fedra_allocation_rng(self.settings.seed, server_round, self.round.attempt)
            matrix = allocation_matrix(rng, budgets, self.num_layers, self.options.cover_all_layers)
            rows = {c: np.flatnonzero(row).tolist() for c, row in zip(clients, matrix, strict=True)}
            self._drawn = (key, rows)
        return self._drawn[1]
