"""Memory and CPU time of a process tree, read from /proc (Linux): what a benchmark charges to
the processes it started (a local Ray is the driver's child tree: GCS, raylet, workers).

Memory is PSS with RSS beside it: Ray workers map the same libraries, and RSS counts a shared page
once per process. CPU is utime+stime; a process is keyed by (pid, start time) so a reused pid is
another process.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1024  # /proc reports kB


@dataclass(frozen=True)
class TreeSample:
    """Memory and CPU time of every process under a root process (the root itself left out)."""

    at: float
    rss_kb: int
    pss_kb: int
    cpu_ticks: dict[tuple[int, int], int]  # (pid, start time): a reused pid is another process


def sample_tree(root: int | None = None) -> TreeSample:
    root = os.getpid() if root is None else root
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = fields
    children = defaultdict(list)
    for pid, fields in stats.items():
        children[int(fields[1])].append(pid)
    rss, pss, ticks, todo = 0, 0, {}, list(children[root])
    while todo:
        pid = todo.pop()
        todo += children[pid]
        r, p = _memory_kb(pid)
        rss, pss = rss + r, pss + p
        ticks[(pid, int(stats[pid][19]))] = int(stats[pid][11]) + int(stats[pid][12])  # utime + stime
    return TreeSample(time.time(), rss, pss, ticks)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (field 3); the name may hold spaces and ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone since the listing
        return None
    return text.rsplit(")", 1)[1].split()


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB; PSS is RSS where smaps_rollup is unreadable (old kernels, permissions)."""
    got = _fields(f"/proc/{pid}/smaps_rollup", ("Rss:", "Pss:"))
    if "Rss:" in got:
        return got["Rss:"], got.get("Pss:", got["Rss:"])
    rss = _fields(f"/proc/{pid}/status", ("VmRSS:",)).get("VmRSS:", 0)  # a zombie has neither: 0
    return rss, rss


def rss_mb(pid: int) -> float:
    """Resident memory of one live process now (0 once it is gone)."""
    return _fields(f"/proc/{pid}/status", ("VmRSS:",)).get("VmRSS:", 0) / MB


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of one live process since its exec (VmHWM; 0 once it is gone). Not
    ru_maxrss: a child forked from a big parent inherits the parent's high-water mark."""
    return _fields(f"/proc/{pid}/status", ("VmHWM:",)).get("VmHWM:", 0) / MB


def _fields(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    try:
        text = Path(path).read_text()
    except OSError:  # the process is gone, or the file unreadable: the caller falls back
        return {}
    return {p[0]: int(p[1]) for line in text.splitlines() if (p := line.split()) and p[0] in keys}


def cpu_seconds(a: TreeSample, b: TreeSample) -> float:
    """CPU seconds the tree used from a to b; a process started in between counts in full."""
    return sum(t - a.cpu_ticks.get(key, 0) for key, t in b.cpu_ticks.items()) / CLK_TCK


def idle_cost(samples: list[TreeSample]) -> dict:
    """Memory: the median sample (one Ray worker starting or exiting is not the idle level)."""
    first, last = samples[0], samples[-1]
    return {
        "rss_mb": statistics.median(s.rss_kb for s in samples) / MB,
        "pss_mb": statistics.median(s.pss_kb for s in samples) / MB,
        "cpu_share": cpu_seconds(first, last) / max(last.at - first.at, 1e-9),
        "processes": len(last.cpu_ticks),
    }
