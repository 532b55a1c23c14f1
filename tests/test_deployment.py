"""Deployment end to end on loopback: a real ``flower-superlink``, real ``flower-supernode``
processes that name their tier in ``--node-config``, and ``flwr run`` against that SuperLink.

- insecure: three SuperNodes (tiers small/medium/large) train at ranks 2, 4 and 8; in round 2
  one of them is killed mid-round, and the round completes with the other two;
- TLS (a CA and a server certificate made with ``openssl``) plus SuperNode authentication: the
  three registered nodes train, a fourth node with an unregistered key is refused;
- a SuperLink restart: the SuperLink and its processes are killed after round 1 (its machine
  loses power), a new one is started on
  the same address and ``--database``, the SuperNodes reconnect by themselves, and the run
  resumed with ``resume = true`` ends with the uninterrupted run's adapter.

The commands are those of ``docs/deployment.md``. Every process is started and stopped here,
and nothing is left running (checked by pid and with ``pgrep``). A deployed SuperNode starts a
fresh ClientApp process per message (Flower's subprocess isolation), so each run takes one to
three minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hetfed.checkpoint import load_checkpoint
from hetfed.results import read_metrics
from tests.conftest import TINY_CONFIG, assert_same_adapter, write_scenario
from tooling.scenarios import OFFLINE_ENV, run_status

pytestmark = pytest.mark.deployment

BIN = Path(sys.executable).parent
TIERS = ("small", "medium", "large")  # TINY_PROFILES: ranks 2, 4, 8
RANKS_LINE = "configure_train: round 1 sends 3 clients their adapters (ranks [2, 4, 8])"
ACTIVATED = "[Fleet.ActivateNode] Activated node_id="
TRAIN_RECEIVED, TRAIN_SENT = "Receiving: train message", "Sending: train message"
RUN_TIMEOUT = 420

if not (BIN / "flower-superlink").exists() or shutil.which("pgrep") is None:
    pytest.skip("needs flower-superlink next to this Python, and pgrep", allow_module_level=True)


# ---------------------------------------------------------------------------- processes
def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _tree(pid: int) -> list[int]:
    """All live descendants of ``pid`` (a SuperLink's or SuperNode's SuperExec and apps)."""
    found = []
    for child in _children(pid):
        found += [child, *_tree(child)]
    return found


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


class Pid(int):
    """A pid with its start time, so that a recycled pid is not taken for ours."""

    started: str | None

    def __new__(cls, pid: int) -> Pid:
        self = super().__new__(cls, pid)
        stat = _stat(pid)
        self.started = stat[1] if stat else None
        return self

    def alive(self) -> bool:
        stat = _stat(self)
        # a zombie has exited (only its parent's wait() is missing)
        return stat is not None and stat[1] == self.started and stat[0] != "Z"


class Processes:
    """The Flower processes one test starts; all of them are stopped at the end."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: set[Pid] = set()  # every process of ours observed (roots and descendants)
        self.ports: set[int] = set()

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, name: str, *args: str | Path) -> subprocess.Popen:
        with (self.folder / f"{name}.log").open("w") as out:
            proc = subprocess.Popen(
                [str(a) for a in args],
                cwd=self.folder,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        self.seen.add(Pid(proc.pid))
        return proc

    def superlink(self, port: int, *extra: str | Path) -> subprocess.Popen:
        self.ports.add(port)
        proc = self.start(
            "superlink",
            BIN / "flower-superlink",
            "--host",
            "127.0.0.1",  # one port for the Fleet, Control and Runtime APIs
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",  # the apps are installed
            *extra,
        )
        self.wait_for(lambda: _listening(port), 90, f"the SuperLink to listen on {port}")
        return proc

    def supernode(
        self, name: str, superlink_port: int, port: int, node_config: str, *extra: str | Path
    ) -> subprocess.Popen:
        self.ports.add(port)
        return self.start(
            name,
            BIN / "flower-supernode",
            *extra,
            "--superlink",
            f"127.0.0.1:{superlink_port}",
            "--port",
            str(port),  # each SuperNode's own Runtime API (its ClientApps connect to it)
            "--node-config",
            node_config,
        )

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            link = self.procs.get("superlink")
            if link is not None and link.poll() is not None:
                pytest.fail(
                    f"the SuperLink exited while waiting for {what}:\n{self.log('superlink')}"
                )
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
            time.sleep(0.5)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        self.wait_for(
            lambda: self.log("superlink").count(ACTIVATED) >= count,
            timeout,
            f"{count} SuperNodes to connect",
        )

    def _descendants(self, pid: int) -> list[Pid]:
        found = [Pid(p) for p in _tree(pid)]
        self.seen.update(found)
        return found

    def crash(self, name: str) -> None:
        """SIGKILL a process and its descendants at once: a device that loses power."""
        proc = self.procs[name]
        for pid in [proc.pid, *self._descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def stop(self, *names: str) -> None:
        """SIGTERM (Flower shuts down gracefully), SIGKILL after 20 s; then their descendants,
        which watch their parent's pid and normally exit on their own."""
        procs = [self.procs[name] for name in names]
        tree = [p for proc in procs for p in self._descendants(proc.pid)]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        tree += [p for child in tree for p in self._descendants(child)]
        deadline = time.monotonic() + 15
        while any(p.alive() for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in tree:
            if pid.alive():
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        self.stop(*[name for name in self.procs if name != "superlink"])  # SuperNodes first
        if "superlink" in self.procs:
            self.stop("superlink")

    def leftovers(self) -> list[str]:
        """Processes of ours still running, by pid and by the ports in their command lines."""
        alive = [str(p) for p in sorted(self.seen) if p.alive()]
        if not self.ports:
            return alive
        ports = "|".join(str(p) for p in sorted(self.ports))
        pattern = rf"127\.0\.0\.1:({ports})\b|--port ({ports})\b"
        out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
        return alive + out.splitlines()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def deployment(tmp_path) -> Iterator[Processes]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperExec, flwr-*app
    }
    for key in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        env.pop(key, None)  # these would open legacy gRPC ports besides --port
    procs = Processes(tmp_path, env)
    try:
        yield procs
    finally:
        procs.stop_all()
        left = procs.leftovers()
        assert not left, f"processes left running: {left}"


# ---------------------------------------------------------------------------- helpers
def write_connection(env: dict[str, str], name: str, address: str, ca: Path | None) -> None:
    """$FLWR_HOME/config.toml naming the SuperLink (the default, so ``flwr ls`` uses it)."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{address}"')
    lines.append(f'root-certificates = "{ca}"' if ca else "insecure = true")
    (Path(env["FLWR_HOME"]) / "config.toml").write_text("\n".join(lines) + "\n")


def deployment_scenario(tmp_path: Path, corpus: Path, **overrides) -> Path:
    config = {
        **TINY_CONFIG,
        "data.source": str(corpus),  # the ServerApp's test split
        "num-server-rounds": 2,
        "min-available-nodes": 3,
        "min-train-nodes": 3,
        "results-dir": str(tmp_path / "results"),
        **overrides,
    }
    return write_scenario(tmp_path / "scenario", config, num_supernodes=3)


def node_config(tier: str, corpus: Path) -> str:
    return f"tier='{tier}' data-path='{corpus}'"


def flwr(procs: Processes, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *[str(a) for a in args]],
        cwd=procs.folder,
        env=procs.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_id_of(output: str) -> str:
    match = re.search(r"Successfully started run (\d+)", output)
    assert match, output[-4000:]
    return match.group(1)


def check_completed(output: str, env: dict[str, str]) -> None:
    """Flower's status of the run is finished:completed (``flwr run`` exits 0 either way)."""
    assert run_status(run_id_of(output), env) == "finished:completed", output[-6000:]
    assert RANKS_LINE in output, output[-6000:]  # each tier is sent its own rank


def check_budgets(results: Path) -> dict:
    summary = json.loads((results / "summary.json").read_text())
    assert sorted(summary["node_budgets"].values()) == ["large", "medium", "small"]
    return summary


# ---------------------------------------------------------------------------- tests
def test_insecure_deployment_tiers_train_and_a_lost_node_does_not_stop_the_run(
    deployment, tmp_path, topics_corpus
):
    """Three SuperNodes name their tiers and train at ranks 2, 4 and 8 in round 1. In round 2
    the 'large' SuperNode is SIGKILLed (with its ClientApp) once it has its adapter: the
    SuperLink stops hearing its heartbeats and answers its message with an error (at the
    latest the round ends at round-timeout), so round 2 aggregates the other two replies and
    the run completes."""
    link_port, *node_ports = free_ports(1 + len(TIERS))
    deployment.superlink(link_port, "--insecure")
    for tier, port in zip(TIERS, node_ports, strict=True):
        deployment.supernode(tier, link_port, port, node_config(tier, topics_corpus), "--insecure")
    write_connection(deployment.env, "lab", f"127.0.0.1:{link_port}", ca=None)
    # round-timeout: above a healthy round's time on a busy 2-core machine; a lost node is
    # given up at most ~60 s after its last heartbeat anyway (30 s interval, patience 2).
    scenario = deployment_scenario(tmp_path, topics_corpus, **{"round-timeout": 90})
    deployment.wait_for_nodes(3)  # all three are sampled in round 1

    with (tmp_path / "flwr-run.log").open("w") as out:
        run = subprocess.Popen(
            [BIN / "flwr", "run", scenario, "lab", "--stream"],
            cwd=tmp_path,
            env=deployment.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deployment.wait_for(
            lambda: deployment.log("large").count(TRAIN_RECEIVED) == 2 or run.poll() is not None,
            RUN_TIMEOUT,
            "the large node to receive its round-2 adapter",
        )
        assert run.poll() is None, deployment.log("flwr-run")[-6000:]
        deployment.crash("large")
        run.wait(timeout=RUN_TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    output = deployment.log("flwr-run")

    assert run.returncode == 0, output[-6000:]
    check_completed(output, deployment.env)
    assert deployment.log("large").count(TRAIN_SENT) == 1  # round 1 only: it died mid-round 2
    rounds = read_metrics(tmp_path / "results")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [(r["sampled"], r["replied"], r["failed"]) for r in rounds[1:]] == [(3, 3, 0), (3, 2, 1)]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert check_budgets(tmp_path / "results")["failed_replies"] == 1


# docs/deployment.md, step 2 (with SUPERLINK_HOST=127.0.0.1), run in the certificates folder.
SERVER_EXT = """\
subjectAltName=IP:127.0.0.1,DNS:localhost
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
"""
OPENSSL_COMMANDS = (
    "openssl req -x509 -newkey rsa:3072 -sha256 -days 365 -nodes -keyout ca.key -out ca.crt "
    "-subj '/CN=hetfed CA' -addext 'basicConstraints=critical,CA:TRUE' "
    "-addext 'keyUsage=critical,keyCertSign,cRLSign'",
    "openssl req -newkey rsa:3072 -sha256 -nodes -keyout server.key -out server.csr "
    "-subj '/CN=superlink'",
    "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 "
    "-sha256 -extfile server.ext -out server.pem",
)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost, made with openssl."""
    folder.mkdir()
    (folder / "server.ext").write_text(SERVER_EXT)
    for command in OPENSSL_COMMANDS:
        subprocess.run(shlex.split(command), cwd=folder, check=True, capture_output=True)
    return folder / "ca.crt", folder / "server.pem", folder / "server.key"


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384``
    writes): the private key stays on the device, the public key is registered."""
    folder.mkdir(exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_and_supernode_auth_refuse_an_unregistered_node(deployment, tmp_path, topics_corpus):
    ca, cert, key = make_certificates(tmp_path / "certificates")
    keys = {name: make_node_key(tmp_path / "keys", name) for name in (*TIERS, "intruder")}
    link_port, *node_ports = free_ports(2 + len(TIERS))
    deployment.superlink(
        link_port,
        "--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key,
        "--enable-supernode-auth",
    )  # fmt: skip
    write_connection(deployment.env, "lab-tls", f"127.0.0.1:{link_port}", ca=ca)

    # Register the three devices' public keys (not the intruder's), in parallel.
    registering = [
        subprocess.Popen(
            [BIN / "flwr", "supernode", "register", keys[tier][1], "lab-tls", "--format", "json"],
            cwd=tmp_path,
            env=deployment.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for tier in TIERS
    ]
    registered = set()
    for reg in registering:
        out, _ = reg.communicate(timeout=60)
        assert reg.returncode == 0, out
        registered.add(str(json.loads(out[out.index("{") :])["node-id"]))
    assert len(registered) == 3

    for name, port in zip((*TIERS, "intruder"), node_ports, strict=True):
        tier = "small" if name == "intruder" else name
        deployment.supernode(
            name, link_port, port, node_config(tier, topics_corpus),
            "--root-certificates", ca, "--auth-supernode-private-key", keys[name][0],
        )  # fmt: skip
    deployment.wait_for_nodes(3)
    intruder = deployment.procs["intruder"]
    deployment.wait_for(lambda: intruder.poll() is not None, 60, "the intruder to be refused")
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in deployment.log("intruder")
    assert "No SuperNode found with the given public key" in deployment.log("superlink")

    scenario = deployment_scenario(tmp_path, topics_corpus)
    proc = flwr(deployment, "run", scenario, "lab-tls", "--stream", timeout=RUN_TIMEOUT)

    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    check_completed(proc.stdout, deployment.env)
    rounds = read_metrics(tmp_path / "results")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["sampled"] == 3 and r["replied"] == 3 and r["failed"] == 0 for r in rounds[1:])
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    summary = check_budgets(tmp_path / "results")
    assert set(summary["node_budgets"]) == registered  # exactly the registered nodes trained
    assert deployment.log("superlink").count(ACTIVATED) == 3


def test_a_run_resumes_after_a_superlink_restart(deployment, tmp_path, topics_corpus):
    """The SuperLink's machine loses power after round 1 of 2: the SuperLink (with a
    ``--database``), its SuperExec and the ServerApp are SIGKILLed at once (a SuperLink process
    killed alone can leave its ServerApp hanging, docs/reliability.md). A new SuperLink on the
    same address and database takes over: the SuperNodes, never restarted, reconnect by
    themselves under their node ids, Flower marks the dead run failed, and
    ``flwr run ... --run-config resume=true`` continues from the checkpoint to the adapter of an
    uninterrupted run on the same nodes (to 1e-6)."""
    link_port, *node_ports = free_ports(1 + len(TIERS))
    database = tmp_path / "superlink.db"
    deployment.superlink(link_port, "--insecure", "--database", database)
    for client_id, (tier, port) in enumerate(zip(TIERS, node_ports, strict=True)):
        config = f"{node_config(tier, topics_corpus)} client-id={client_id}"  # named across runs
        deployment.supernode(tier, link_port, port, config, "--insecure")
    write_connection(deployment.env, "lab", f"127.0.0.1:{link_port}", ca=None)
    scenario = deployment_scenario(
        tmp_path, topics_corpus, **{"round-timeout": 300, "resume": False}
    )
    deployment.wait_for_nodes(3)
    whole = tmp_path / "whole"
    proc = flwr(
        deployment, "run", scenario, "lab", "--stream",
        "--run-config", f"results-dir={json.dumps(str(whole))}", timeout=RUN_TIMEOUT,
    )  # fmt: skip
    check_completed(proc.stdout, deployment.env)

    results = tmp_path / "results"
    with (tmp_path / "flwr-run.log").open("w") as out:
        run = subprocess.Popen(
            [BIN / "flwr", "run", scenario, "lab", "--stream"],
            cwd=tmp_path,
            env=deployment.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deployment.wait_for(
            lambda: load_checkpoint(results) is not None or run.poll() is not None,
            RUN_TIMEOUT,
            "the checkpoint of round 1",
        )
        deployment.crash("superlink")
        run.wait(timeout=60)  # its log stream lost the SuperLink
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    stopped = load_checkpoint(results)
    assert stopped.server_round == 1 and not (results / "summary.json").exists()
    killed_run = run_id_of(deployment.log("flwr-run"))

    deployment.superlink(link_port, "--insecure", "--database", database)
    proc = flwr(
        deployment, "run", scenario, "lab", "--stream", "--run-config", "resume=true",
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert run_status(run_id_of(proc.stdout), deployment.env) == "finished:completed"
    assert "resuming after round 1" in proc.stdout, proc.stdout[-6000:]
    assert all(deployment.procs[tier].poll() is None for tier in TIERS)  # never restarted
    assert ACTIVATED not in deployment.log("superlink")  # the database knew them
    deployment.wait_for(
        lambda: run_status(killed_run, deployment.env) == "finished:failed",
        120,
        "the killed run to be marked failed",
    )
    rounds, expected = read_metrics(results), read_metrics(whole)
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["replied"] == 3
    assert [r["accuracy"] for r in rounds] == [r["accuracy"] for r in expected]
    assert check_budgets(results)["resumed_after_round"] == 1
    assert_same_adapter(results, whole)
