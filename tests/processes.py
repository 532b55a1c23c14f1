"""Long-running processes that a test starts (SuperLinks, SuperNodes, Ray nodes) and always
stops: by pid, with the start time, so that a recycled pid is never taken for one of ours."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


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


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _tree(pid: int) -> list[int]:
    """All live descendants of ``pid``."""
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
    """The processes one test starts, each logging to ``<folder>/<name>.log``; all of them are
    stopped at the end. A wait fails as soon as one of the ``essential`` processes exits."""

    essential: tuple[str, ...] = ()

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: set[Pid] = set()  # every process of ours observed (roots and descendants)
        self.ports: set[int] = set()  # ours: a process naming one in its command line is ours
        self.markers: set[str] = set()  # so is one naming one of these (e.g. a private folder)

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def env_for(self, name: str) -> dict[str, str]:
        return self.env

    def start(self, name: str, *args: str | Path) -> subprocess.Popen:
        with (self.folder / f"{name}.log").open("w") as out:
            proc = subprocess.Popen(
                [str(a) for a in args],
                cwd=self.folder,
                env=self.env_for(name),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        self.seen.add(Pid(proc.pid))
        return proc

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name in self.essential:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    pytest.fail(f"{name} exited while waiting for {what}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
            time.sleep(0.5)

    def descendants(self, pid: int) -> list[Pid]:
        found = [Pid(p) for p in _tree(pid)]
        self.seen.update(found)
        return found

    def crash(self, name: str) -> None:
        """SIGKILL a process and its descendants at once: a device that loses power."""
        proc = self.procs[name]
        for pid in [proc.pid, *self.descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def kill(self, name: str) -> list[Pid]:
        """SIGKILL the process alone (a crash of that process); its descendants, returned, are
        left to notice by themselves. Its log is kept as ``<name>-killed.log``."""
        proc = self.procs.pop(name)
        orphans = self.descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
        (self.folder / f"{name}.log").rename(self.folder / f"{name}-killed.log")
        return orphans

    def stop(self, *names: str) -> None:
        """SIGTERM (a graceful shutdown), SIGKILL after 20 s; then their descendants, which
        normally exit on their own, and any process of ours named by a marker."""
        procs = [self.procs[name] for name in names]
        tree = [p for proc in procs for p in self.descendants(proc.pid)]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        tree += [p for child in tree for p in self.descendants(child)]
        deadline = time.monotonic() + 15
        while any(p.alive() for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in tree:
            if pid.alive():
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Every process but the essential ones first (clients before their server), then
        those one by one, last started first; then any process left that names one of our
        markers (only those: a port number alone is not proof enough to kill a process)."""
        self.stop(*[name for name in self.procs if name not in self.essential])
        for name in reversed([name for name in self.procs if name in self.essential]):
            self.stop(name)
        for line in self._matching(by_port=False):
            pid = Pid(int(line.split()[0]))
            if pid.alive():
                os.kill(pid, signal.SIGKILL)

    def _matching(self, by_port: bool = True) -> list[str]:
        """``"PID COMMAND LINE"`` of each running process whose command line names one of our
        markers (or ports)."""
        ports = "|".join(str(p) for p in sorted(self.ports) if by_port) or "(?!)"
        port = re.compile(rf"127\.0\.0\.1:({ports})\b|--port[ =]({ports})\b")
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, UnicodeDecodeError):
                continue
            if port.search(command) or any(marker in command for marker in self.markers):
                found.append(f"{entry.name} {command.strip()}")
        return found

    def leftovers(self) -> list[str]:
        """Processes of ours still running: by pid, by the ports and markers in their command
        lines."""
        return [str(p) for p in sorted(self.seen) if p.alive()] + self._matching()
