"""Who holds a TCP port, and clearing what a killed run of ours left behind.

When `exfm run` or `exfm serve` dies hard (SIGKILL, out of memory), Ray's processes go with it but
Serve's HAProxy child can survive, orphaned, still holding the HTTP port (and its stats and metrics
ports); the next start then fails inside Ray with HAProxy's "cannot bind socket". Before starting a
local Ray we look at the ports: an orphaned HAProxy (no Ray process above it) is ours and is
stopped; anything else is named to the user with how to stop it. Linux (/proc) only; elsewhere
nothing is checked.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from exfm_ray.errors import ConfigError

_PROC = Path("/proc")
_RAY_MARKERS = ("ray::", "raylet", "gcs_server", "default_worker.py")


@dataclass(frozen=True)
class Listener:
    port: int
    pid: int
    name: str
    cmdline: str


def listener(port: int) -> Listener | None:
    """The process listening on TCP `port` (any address, v4 or v6); None if none is, or unknowable."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for fd_dir in _PROC.glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pid = int(fd_dir.parent.name)
                    return Listener(port, pid, _read(pid, "comm"), _read(pid, "cmdline").replace("\0", " ").strip())
        except OSError:  # another user's process, or it just ended
            continue
    return None


def clear_leftovers(ports: list[int], *, log=print) -> list[int]:
    """Stop orphaned HAProxy processes holding any of `ports`; returns their pids. Raises ConfigError
    naming the process if anything else holds one (a running service must not be killed for us)."""
    stopped = []
    for port in ports:
        held = listener(port)
        if held is None:
            continue
        if held.name == "haproxy" and not _under_ray(held.pid):
            _stop(held.pid)
            log(f"stopped HAProxy (pid {held.pid}) left by an earlier run of Ray Serve: it held port {port}")
            stopped.append(held.pid)
            continue
        owner = "a running Ray Serve" if _under_ray(held.pid) else held.name
        raise ConfigError(
            f"port {port} is held by {owner} (pid {held.pid}: {held.cmdline[:120]}); stop it (`kill {held.pid}`, "
            "or `serve shutdown` / `ray stop` for a Ray of yours) or choose another port"
        )
    return stopped


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def _under_ray(pid: int) -> bool:
    """Whether a Ray process (worker, raylet, GCS) is among the process's ancestors."""
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        stat = _read(pid, "stat")
        if not stat:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: the parent's pid
        text = _read(pid, "cmdline").replace("\0", " ")
        if any(m in text for m in _RAY_MARKERS):
            return True
    return False


def _stop(pid: int, wait_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not _exited(pid):
            time.sleep(0.05)
        if (_PROC / str(pid)).exists():
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent to reap it (it holds no port any more)."""
    return not (_PROC / str(pid)).exists() or _read(pid, "stat").split()[2:3] == ["Z"]


def _read(pid: int, name: str) -> str:
    try:
        return (_PROC / str(pid) / name).read_text().strip()
    except OSError:
        return ""
