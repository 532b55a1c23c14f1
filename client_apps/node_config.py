"""What a node's ``--node-config`` may say, read by both halves of the ClientApp (the budget
query and the train message); light to import, as the budget query must be."""

from __future__ import annotations

from flwr.app import Context

# node-config keys a SuperNode may set (simulation sets the first two itself).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NODE_TIER = "tier"
NODE_DATA = "data-path"
NODE_CLIENT_ID = "client-id"  # deployment: a number that names this device across runs
NODE_STATE_DIR = "state-dir"  # where the client keeps its personal factors (personal_state)


def client_id(context: Context) -> int:
    """A number naming this client across runs (node ids change between runs): ``client-id``
    from the node config, else the partition id, else the node id."""
    node_config = context.node_config
    return int(node_config.get(NODE_CLIENT_ID, node_config.get(PARTITION_ID, context.node_id)))
