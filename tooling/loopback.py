"""A SuperLink and SuperNodes on 127.0.0.1, started and stopped as processes with the commands
of docs/deployment.md: the deployment test (tests/test_deployment.py) and hetfed bench's
per-message item; the cluster test (tests/test_cluster.py) starts its Ray nodes the same way.
Every process is stopped at the end, with its descendants (Flower's SuperExec and app
processes, Ray's raylet and workers), which are tracked by pid and start time.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tooling.scenarios import OFFLINE_ENV

BIN = Path(sys.executable).parent
ACTIVATED = "[Fleet.ActivateNode] Activated node_id="


def loopback_env(flwr_home: Path) -> dict[str, str]:
    """The environment of the processes: offline, their own FLWR_HOME, this environment's
    Flower commands first on PATH (SuperExec and the flwr-*app processes are found there)."""
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for key in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        env.pop(key, None)  # these would open legacy gRPC ports besides --port
    return env


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
    """The processes one test starts; all of them are stopped at the end. A wait fails as soon
    as one of the ``essential`` processes exits."""

    essential: tuple[str, ...] = ("superlink",)

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: set[Pid] = set()  # every process of ours observed (roots and descendants)
        self.ports: set[int] = set()

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(
        self, name: str, *args: str | Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start ``args`` as ``name``, in ``env`` (default: ``self.env``)."""
        with (self.folder / f"{name}.log").open("w") as out:
            proc = subprocess.Popen(
                [str(a) for a in args],
                cwd=self.folder,
                env=self.env if env is None else env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        self.seen.add(Pid(proc.pid))
        return proc

    def own_home(self, name: str) -> dict[str, str]:
        """``self.env`` with a ``FLWR_HOME`` of the process's own, ``flwr-<name>``: Flower
        processes on one machine must not share one (docs/deployment.md)."""
        return {**self.env, "FLWR_HOME": str(self.folder / f"flwr-{name}")}

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
            env=self.own_home("superlink"),
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
            env=self.own_home(name),
        )

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name in self.essential:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited while waiting for {what}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}\n{logs}")
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
        """The other processes first (SuperNodes before their SuperLink), then the essential
        ones, last started first."""
        self.stop(*[name for name in self.procs if name not in self.essential])
        for name in reversed([name for name in self.procs if name in self.essential]):
            self.stop(name)

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


def write_connection(env: dict[str, str], name: str, address: str, ca: Path | None) -> None:
    """$FLWR_HOME/config.toml naming the SuperLink (the default, so ``flwr ls`` uses it)."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{address}"')
    lines.append(f'root-certificates = "{ca}"' if ca else "insecure = true")
    (Path(env["FLWR_HOME"]) / "config.toml").write_text("\n".join(lines) + "\n")


def flwr(procs: Processes, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``flwr ARGS`` in the processes' folder and environment."""
    return subprocess.run(
        [str(BIN / "flwr"), *[str(a) for a in args]],
        cwd=procs.folder,
        env=procs.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_id_of(output: str) -> str:
    """The run id ``flwr run`` printed."""
    match = re.search(r"Successfully started run (\d+)", output)
    if match is None:
        raise ValueError(f"no run was started:\n{output[-4000:]}")
    return match.group(1)
