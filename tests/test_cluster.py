"""An existing Ray cluster, end to end: ``hetfed run`` with ``RAY_ADDRESS`` naming a cluster of
two Ray nodes (started here with ``ray start``: a head with one CPU, a second node with two,
each with its own temp folder and ports), and Ray's state API showing where the clients ran.

Flower's Ray backend calls ``ray.init()`` without an address in ``flwr-simulation``, the process
the SuperLink starts for a run, so Ray joins the cluster that ``RAY_ADDRESS`` names. The variable
reaches it through the SuperLink that ``flwr`` starts, and ``flwr`` would reuse one already
listening on its port, so the run gets a SuperLink of its own (``FLWR_HOME`` and ports). The
actor pool is sized node by node: one ClientApp actor on the head, two on the second node. The
state API is served by the head's dashboard, which needs ``ray[default]`` (hetfed's ``cluster``
extra). Nothing started here outlives the test: the Ray nodes are stopped with their processes
(``tooling/loopback.py``), and none is left that names the cluster's ports.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hetfed.results import read_metrics
from tests.conftest import hetfed_run, write_scenario
from tooling.loopback import BIN, Processes, free_ports
from tooling.superlink import stop_superlinks_on

pytestmark = pytest.mark.cluster

if importlib.util.find_spec("ray") is None:
    pytest.skip("needs Ray", allow_module_level=True)

HEAD_CPUS, WORKER_CPUS = 1, 2
CLIENT = "ClientAppActor"  # Flower's Ray actor; each call of its ``run`` is one message


@dataclass
class Cluster:
    address: str  # the GCS address, what RAY_ADDRESS names
    api: str  # the dashboard's URL, where the state API answers
    head: str  # node ids
    worker: str


class RayNodes(Processes):
    essential = ("ray-head", "ray-worker")


def _node(procs: RayNodes, name: str, root: Path, cpus: int, *args: str) -> None:
    (agent,) = free_ports(1)
    procs.start(
        name,
        BIN / "ray",
        "start",
        "--block",  # in the foreground: stopping this process stops the node
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        f"--temp-dir={root / name}",  # not /tmp/ray: other Ray users on this machine
        f"--dashboard-agent-listen-port={agent}",  # would find this node there
        "--disable-usage-stats",
        *args,
    )


def _alive_nodes(api: str) -> list:
    from ray.util.state import list_nodes

    try:
        return list_nodes(address=api, filters=[("state", "=", "ALIVE")], timeout=10)
    except Exception:  # the dashboard is still starting
        return []


@pytest.fixture
def ray_cluster(tmp_path) -> Iterator[Cluster]:
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (what ray[default] adds)
    except ImportError as err:
        pytest.fail(f"Ray's state API needs the dashboard ({err}): pip install -e '.[cluster]'")
    # Ray's socket paths must stay short: a folder of its own directly under /tmp.
    root = Path(tempfile.mkdtemp(prefix="hetfed-ray-", dir="/tmp"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    procs = RayNodes(tmp_path, env)
    gcs, dashboard, client_server = free_ports(3)
    procs.ports.add(gcs)  # every Ray process of the cluster names the GCS address
    api = f"http://127.0.0.1:{dashboard}"
    try:
        _node(
            procs, "ray-head", root, HEAD_CPUS,
            "--head", f"--port={gcs}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client_server}",
        )  # fmt: skip
        procs.wait_for(lambda: len(_alive_nodes(api)) == 1, 180, "the Ray head")
        _node(procs, "ray-worker", root, WORKER_CPUS, f"--address=127.0.0.1:{gcs}")
        procs.wait_for(lambda: len(_alive_nodes(api)) == 2, 180, "the second Ray node")
        nodes = {node.is_head_node: node for node in _alive_nodes(api)}
        assert nodes[True].resources_total["CPU"] == HEAD_CPUS
        assert nodes[False].resources_total["CPU"] == WORKER_CPUS
        yield Cluster(f"127.0.0.1:{gcs}", api, nodes[True].node_id, nodes[False].node_id)
    finally:
        procs.stop_all()
        left = procs.leftovers()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left running: {left}"


def test_a_run_joins_a_ray_cluster_and_both_nodes_run_clients(ray_cluster, tmp_path, tiny_config):
    from ray.util.state import list_actors, list_tasks

    home = tmp_path / "flwr-home"
    link, control = free_ports(2)
    scenario = write_scenario(
        tmp_path / "scenario",
        {**tiny_config, "num-server-rounds": 2, "train.local-steps": 4},
        simulation={"client-resources-num-cpus": 1},  # one actor per CPU of each node
    )
    env = {
        "RAY_ADDRESS": ray_cluster.address,
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(link),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
    }
    try:
        proc = hetfed_run(home, tmp_path, scenario, env=env)
    finally:
        stop_superlinks_on(link)  # and with it the run's Ray driver, if still there

    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "ended with status finished:completed" in proc.stdout
    rounds = read_metrics(tmp_path / "results")
    assert [(r["round"], r.get("replied")) for r in rounds[1:]] == [(1, 4), (2, 4)]

    # The run's actors lived in this cluster, one per CPU of each node ...
    actors = list_actors(address=ray_cluster.api, filters=[("class_name", "=", CLIENT)])
    assert Counter(a.node_id for a in actors) == {ray_cluster.head: 1, ray_cluster.worker: 2}
    # ... and each node ran ClientApp calls to the end.
    calls = list_tasks(
        address=ray_cluster.api,
        filters=[("func_or_class_name", "=", f"{CLIENT}.run"), ("state", "=", "FINISHED")],
        detail=True,
        limit=1000,
    )
    per_node = Counter(call.node_id for call in calls)
    print(  # shown by pytest -rP (CI's cluster job)
        f"ClientApp calls per Ray node: head ({HEAD_CPUS} CPU) {per_node[ray_cluster.head]}, "
        f"second node ({WORKER_CPUS} CPUs) {per_node[ray_cluster.worker]}"
    )
    assert set(per_node) == {ray_cluster.head, ray_cluster.worker}, per_node
    # 4 budget queries, then 4 train messages in each of the 2 rounds
    assert sum(per_node.values()) == 12, per_node
