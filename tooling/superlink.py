"""Which SuperLink a ``flwr run`` from this environment reaches, said before it runs.

``flwr run`` sends a run to the default connection of ``$FLWR_HOME/config.toml``. The stock
one is ``local``: flwr starts a SuperLink on 127.0.0.1 (port ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
39091 by default) the first time and reuses whatever answers on that port later, even one that
another FLWR_HOME started. Such a run is then run by that SuperLink, with its FLWR_HOME and the
environment that started it, and a later status query from here may not find it. So
``hetfed run`` names the SuperLink it uses and warns about a foreign one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flwr.cli.constant import LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE as LOCAL
from flwr.cli.constant import LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE_IN_MEMORY as LOCAL_IN_MEMORY
from flwr.supercore.utils import get_flwr_home

DEFAULT_LOCAL_PORT = "39091"  # flwr's default for FLWR_LOCAL_SUPERLINK_HTTP_API_PORT


@dataclass(frozen=True)
class LocalSuperLink:
    """A running ``flower-superlink`` process, from its command line."""

    pid: int
    port: str
    home: Path | None  # the FLWR_HOME whose local-superlink/ folder it logs to (None: not flwr's)


def local_port(env: dict[str, str] | None = None) -> str:
    """The port of flwr's managed local SuperLink for ``env`` (this process's by default)."""
    env = os.environ if env is None else env
    return env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", DEFAULT_LOCAL_PORT)


def flower_home(env: dict[str, str] | None = None) -> Path:
    """``FLWR_HOME`` of ``env``, as flwr resolves it."""
    env = os.environ if env is None else env
    return Path(env["FLWR_HOME"]).expanduser() if "FLWR_HOME" in env else get_flwr_home()


def default_connection(home: Path) -> tuple[str, str]:
    """The name and address of the connection ``flwr run`` uses from ``home`` (flwr's stock
    ``local`` one when ``config.toml`` does not exist yet)."""
    path = home / "config.toml"
    if not path.is_file():
        return "local", LOCAL
    superlinks = tomllib.loads(path.read_text(encoding="utf-8")).get("superlink", {})
    name = superlinks.get("default", "local")
    return name, str(superlinks.get(name, {}).get("address", LOCAL))


def running_superlinks() -> list[LocalSuperLink]:
    """The ``flower-superlink`` processes of this machine (none where ``pgrep`` is missing)."""
    try:
        pids = subprocess.run(
            ["pgrep", "-f", "flower-superlink"], capture_output=True, text=True, check=False
        ).stdout.split()
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if not any(a.endswith("flower-superlink") for a in args[:2]):
            continue
        option = dict(zip(args, args[1:], strict=False))
        log_file = option.get("--log-file")
        home = Path(log_file).parent.parent if log_file else None
        found.append(LocalSuperLink(int(pid), option.get("--port", "8000"), home))
    return found


def describe_target(env: dict[str, str] | None = None) -> tuple[str, str | None]:
    """What ``flwr run`` from ``env`` reaches, in words, and a warning when it is a local
    SuperLink that another FLWR_HOME started (None otherwise)."""
    home = flower_home(env)
    name, address = default_connection(home)
    if address not in (LOCAL, LOCAL_IN_MEMORY):
        return f"SuperLink {address} (connection '{name}' of {home / 'config.toml'})", None
    port = local_port(env)
    listening = [s for s in running_superlinks() if s.port == port]
    if not listening:
        return f"a new local SuperLink on 127.0.0.1:{port} for FLWR_HOME={home}", None
    link = listening[0]
    said = f"the local SuperLink on 127.0.0.1:{port} (pid {link.pid}, FLWR_HOME={link.home})"
    if link.home is not None and link.home.resolve() == home.resolve():
        return said, None
    return said, (
        f"the local SuperLink on 127.0.0.1:{port} was started for FLWR_HOME={link.home}, not "
        f"{home}: this run goes to it and runs with the environment that started it. Stop it "
        f"(kill {link.pid}) or give this run a port of its own "
        "(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and FLWR_LOCAL_CONTROL_API_PORT)."
    )


def stop_superlinks_on(port: str | int, timeout: float = 30) -> None:
    """Stop the ``flower-superlink`` processes listening on ``port`` and wait until they are
    gone (what a test that started one on its own port leaves behind)."""

    def running() -> list[int]:
        return [s.pid for s in running_superlinks() if s.port == str(port)]

    for pid in running():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the SuperLink on port {port} did not stop in {timeout:g} s")
        time.sleep(0.5)
