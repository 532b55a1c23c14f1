"""The hetfed ClientApp: report a device budget, train the adapter it is sent, return it.

A node learns its tier from ``--node-config`` (``tier='phone'``) or, in simulation, from its
partition id and the profile's assignment. This module is light to import: a deployed SuperNode
starts one ClientApp process per message, and a budget query imports only Flower, numpy and
PyYAML. A train message imports :mod:`client_apps.local_training` (PyTorch, transformers, peft
and the base model, which a process keeps between messages).
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client_apps.node_config import NODE_TIER, NUM_PARTITIONS, PARTITION_ID, client_id
from hetfed import wire
from hetfed.budgets import tier_from_memory
from hetfed.errors import ConfigError
from hetfed.faults import fault_injection
from hetfed.profiles import DeviceProfiles, Tier, available_memory_gb, parse_profiles

app = ClientApp()


def node_tier(
    node_config: dict, profiles: DeviceProfiles, needs_gb: list[float] | None = None
) -> Tier:
    """A node's tier: named in its node config (deployment; ``auto`` picks it from measured free
    memory: the tier with the largest update that fits it less the profiles' reserve, when the
    server sent what each tier's update needs, ``needs_gb``, else the largest ``memory-gb``), or
    assigned by partition id (simulation). A named tier always wins."""
    if NODE_TIER in node_config:
        name = str(node_config[NODE_TIER])
        if name == "auto":
            return tier_from_memory(profiles, available_memory_gb(), needs_gb)
        return profiles.tier(name, key="node-config tier")
    if PARTITION_ID in node_config and NUM_PARTITIONS in node_config:
        return profiles.tier_for_partition(
            int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
        )
    raise ConfigError(
        "node-config",
        dict(node_config),
        "'tier' (deployment) or 'partition-id' and 'num-partitions' (simulation)",
    )


@app.query()
def report_budget(msg: Message, context: Context) -> Message:
    """Tell the server this node's tier and LoRA budget (the server sent the profiles)."""
    config = msg.content[wire.CONFIG]
    profiles = parse_profiles(str(config[wire.PROFILES]), "profiles (from server)")
    needs = [float(gb) for gb in config[wire.TIER_MEMORY]] if wire.TIER_MEMORY in config else None
    tier = node_tier(context.node_config, profiles, needs)
    budget = wire.BudgetReply(tier.name, tier.rank, client_id(context)).to_record()
    context.state[wire.BUDGET] = budget
    return Message(RecordDict({wire.BUDGET: budget}), reply_to=msg)


@app.train(mods=[fault_injection])
def train(msg: Message, context: Context) -> Message:
    """Load the sent adapter at the sent rank, train locally, return the adapter and metrics."""
    # imported here, not at the top, so that a budget query never pays for PyTorch,
    # transformers and peft (a deployed SuperNode starts one process per message)
    from client_apps.local_training import train_locally
    from hetfed.config import parse_run_config

    settings, _ = parse_run_config(context.run_config, strict=False)
    if settings.simulation.packed:
        from client_apps.packed_trainer import train_in_pack

        return train_in_pack(msg, context)
    return train_locally(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: score the sent global adapter on this node's own test split."""
    from client_apps.local_training import evaluate_locally  # PyTorch only when evaluating

    return evaluate_locally(msg, context)
