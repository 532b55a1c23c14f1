"""A deployed SuperNode starts one ClientApp process per message: a budget query, answered in a
fresh process as Flower's flwr-clientapp does (import the app, call it with the message), imports
neither PyTorch nor transformers, peft or datasets; a train message does."""

from __future__ import annotations

import json
import subprocess
import sys

from hetfed import wire
from tests.conftest import REPO, TINY_PROFILES

HEAVY = ("torch", "transformers", "peft", "datasets", "pandas")

_QUERY = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as Flower's runtime
profiles, heavy = sys.argv[1], sys.argv[2].split(",")
flower = set(sys.modules)
from client_apps.lora_client import app
from hetfed import wire

query = Message(
    RecordDict({wire.CONFIG: ConfigRecord({wire.PROFILES: profiles})}),
    dst_node_id=7,
    message_type=MessageType.QUERY,
)
node_config = {"tier": "medium", "client-id": 3}
context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
reply = app(query, context)
print(json.dumps({
    "budget": dict(reply.content[wire.BUDGET]),
    "heavy": sorted(m for m in heavy if m in sys.modules),
    "flower_heavy": sorted(m for m in heavy if m in flower),
}))
"""
_TRAIN_HALF = """
import sys, client_apps.local_training
print(",".join(m for m in sys.argv[1].split(",") if m in sys.modules))
"""


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_a_budget_query_imports_no_torch_transformers_or_peft():
    result = json.loads(_run(_QUERY, TINY_PROFILES, ",".join(HEAVY)))
    assert result["budget"] == {wire.TIER: "medium", wire.RANK: 4, wire.CLIENT_ID: 3}
    assert result["flower_heavy"] == []  # Flower's own imports bring none of them either
    assert result["heavy"] == []


def test_the_train_half_brings_them():
    """The other side of the split: the train message's module is the heavy part."""
    assert _run(_TRAIN_HALF, ",".join(HEAVY)) == ",".join(HEAVY)
