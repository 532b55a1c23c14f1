"""The clients a run knows: their device budgets, and their client ids next to Flower's node ids.

Flower names a connected node by a node id that changes from run to run; hetfed names a client
by a stable *client id* (its partition in simulation, a ``client-id`` node-config value in
deployment), learned with its budget. Every hook, per-client state, sampling and seed uses
client ids; node ids are used only to address messages. Nodes are asked for their budget once
per run, when they are first seen (all of them in round 1, new ones when they appear).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from hetfed import seeds, wire
from hetfed.budgets import reported_rank_problem
from hetfed.config import RunSettings
from hetfed.profiles import DeviceProfiles


@dataclass(frozen=True)
class NodeBudget:
    """What a node told the server it can afford."""

    tier: str
    rank: int
    layers: int | None = None  # how many transformer blocks it trains (None: all)


class NodeRegistry:
    """Budgets by client id, and the client id <-> node id maps of this run."""

    def __init__(self, num_layers: int | None = None) -> None:
        self.num_layers = num_layers  # transformer blocks of the base model, for layer budgets
        self.budgets: dict[int, NodeBudget] = {}
        self.node_of: dict[int, int] = {}  # client id -> Flower node id in this run
        self.client_of: dict[int, int] = {}  # Flower node id -> client id
        self.query_config: dict = {}  # what a budget query says (the profiles, tier memory)

    def register(
        self,
        grid: Grid,
        profiles: DeviceProfiles,
        min_nodes: int,
        timeout: float,
        tier_memory: list[float] | None = None,
    ) -> list[int]:
        """Wait for ``min_nodes`` nodes, learn the budget of nodes not seen before (checked
        against ``profiles``; ``tier_memory``, the GB each tier's update needs, lets a device
        with ``tier='auto'`` pick by its measured memory), and return the sorted client ids of
        the connected nodes that reported one."""
        self.query_config = {wire.PROFILES: profiles.text}
        if tier_memory is not None:
            self.query_config[wire.TIER_MEMORY] = tier_memory
        deadline = time.monotonic() + timeout
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < min_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(node_ids)} nodes connected, min-available-nodes is {min_nodes}"
                )
            time.sleep(1.0)
            node_ids = sorted(grid.get_node_ids())
        unknown = [n for n in node_ids if n not in self.client_of]
        if unknown:
            self._query(grid, profiles, unknown, set(node_ids), timeout)
        return sorted(self.client_of[n] for n in node_ids if n in self.client_of)

    def _query(
        self,
        grid: Grid,
        profiles: DeviceProfiles,
        nodes: list[int],
        connected: set[int],
        timeout: float,
    ) -> None:
        """Ask nodes for their tier, rank and client id (once per node and run)."""
        content = RecordDict({wire.CONFIG: ConfigRecord(self.query_config)})
        queries = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node_id = reply.metadata.src_node_id
            client_id, budget, problem = self._budget_of(reply, profiles)
            bound = self.node_of.get(client_id) if client_id is not None else None
            if problem is None and bound is not None and bound in connected:
                problem = f"client id {client_id} is already used by connected node {bound}"
            if problem is not None:
                log(WARNING, "node %d has no budget (it will be asked again): %s", node_id, problem)
                continue
            self.client_of.pop(bound, None)  # a client that came back under a new node id
            self.node_of[client_id] = node_id
            self.client_of[node_id] = client_id
            self.budgets[client_id] = budget
        log(
            INFO,
            "budgets: %d clients known, tiers %s",
            len(self.budgets),
            dict(Counter(b.tier for b in self.budgets.values())),
        )

    def _budget_of(
        self, reply: Message, profiles: DeviceProfiles
    ) -> tuple[int | None, NodeBudget | None, str | None]:
        """(client id, budget, None) of a query reply, or (.., .., the reason it is unusable)."""
        if reply.has_error():
            return None, None, reply.error.reason
        try:
            answer = wire.BudgetReply.from_record(reply.content[wire.BUDGET])
        except (KeyError, TypeError, ValueError) as err:
            return None, None, f"malformed budget reply ({err})"
        if answer.tier not in profiles.tiers:
            return None, None, f"unknown tier {answer.tier!r}"
        tier = profiles.tiers[answer.tier]
        problem = reported_rank_problem(tier, answer.rank)
        if problem is not None:
            return None, None, problem
        layers = tier.layer_budget(self.num_layers) if self.num_layers is not None else None
        return answer.client_id, NodeBudget(answer.tier, answer.rank, layers), None


def sample_evaluation(settings: RunSettings, server_round: int, clients: list[int]) -> list[int]:
    """``fraction-evaluate`` of the known ``clients`` (at least one), drawn with
    :func:`hetfed.seeds.evaluation_sampling_rng`: a round's federated evaluation."""
    size = max(int(len(clients) * settings.fraction_evaluate), 1)
    return _draw(clients, size, seeds.evaluation_sampling_rng(settings.seed, server_round))


def _draw(clients: list[int], size: int, rng: np.random.Generator) -> list[int]:
    """``size`` of ``clients`` (all, if fewer), without replacement, sorted."""
    picked = rng.choice(len(clients), size=min(size, len(clients)), replace=False)
    return sorted(clients[i] for i in picked)


def sample_clients(
    settings: RunSettings, server_round: int, attempt: int, clients: list[int]
) -> list[int]:
    """``fraction-train`` of the available ``clients`` (at least ``min-train-nodes``), drawn
    with :func:`hetfed.seeds.sampling_rng`: the same clients in a resumed run."""
    size = max(int(len(clients) * settings.fraction_train), settings.min_train_nodes)
    return _draw(clients, size, seeds.sampling_rng(settings.seed, server_round, attempt))
