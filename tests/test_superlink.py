"""``hetfed run`` names the SuperLink a run goes to, and warns about one another FLWR_HOME left."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tooling.loopback import free_ports
from tooling.superlink import describe_target, running_superlinks, stop_superlinks_on


def _start_local_superlink(home: Path, port: int) -> subprocess.Popen:
    """A SuperLink as flwr starts its managed local one for ``home`` (its log in
    ``home/local-superlink``), on ``port``."""
    (home / "local-superlink").mkdir(parents=True)
    command = [
        str(Path(sys.executable).parent / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-file",
        str(home / "local-superlink" / "superlink.log"),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_local_superlink_of_another_flower_home_is_named_and_warned_about(tmp_path):
    port, control = free_ports(2)
    other, mine = tmp_path / "other-home", tmp_path / "my-home"
    env = {
        "FLWR_HOME": str(mine),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
    }
    said, warning = describe_target(env)
    assert said == f"a new local SuperLink on 127.0.0.1:{port} for FLWR_HOME={mine}"
    assert warning is None

    process = _start_local_superlink(other, port)
    try:
        deadline = time.monotonic() + 30
        while not any(s.port == str(port) for s in running_superlinks()):
            assert time.monotonic() < deadline, "the SuperLink did not start"
            time.sleep(0.2)
        said, warning = describe_target(env)
        assert f"127.0.0.1:{port} (pid {process.pid}, FLWR_HOME={other})" in said
        assert f"started for FLWR_HOME={other}, not {mine}" in warning
        assert f"kill {process.pid}" in warning and "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" in warning
        _, warning = describe_target({**env, "FLWR_HOME": str(other)})
        assert warning is None  # its own SuperLink
    finally:
        stop_superlinks_on(port)
    assert process.wait(timeout=30) is not None


def test_a_configured_superlink_is_named_from_the_flower_config(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "10.0.0.7:9093"\n'
    )
    said, warning = describe_target({"FLWR_HOME": str(tmp_path)})
    assert said == f"SuperLink 10.0.0.7:9093 (connection 'lab' of {tmp_path / 'config.toml'})"
    assert warning is None
