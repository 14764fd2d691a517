"""Connecting to Ray: an existing cluster (--address / EXFM_RAY_ADDRESS / `ray job submit`), or
a local one. Only jobs/ start or join Ray; the library never does."""

from __future__ import annotations

import os
import subprocess

import ray

NAMESPACE = "exfm"


def connect(address: str | None, *, persistent: bool = False, num_cpus: int | None = None) -> str:
    """Join Ray and return its address.

    address None: join the cluster this process belongs to (`ray job submit` sets RAY_ADDRESS) or
    a local `ray start` cluster; if there is none, start one: a persistent local head (for
    long-lived actors such as the FM group, stop it with `ray stop`) or an embedded Ray that ends
    with this process.
    """
    kwargs = {"namespace": NAMESPACE, "log_to_driver": False, "ignore_reinit_error": True}
    if address:
        ray.init(address=address, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", **kwargs)
    elif persistent:
        try:  # a local cluster started earlier with `ray start`
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            cmd = [_ray_cli(), "start", "--head", "--disable-usage-stats", "--include-dashboard=false"]
            if num_cpus:
                cmd.append(f"--num-cpus={num_cpus}")
            subprocess.run(cmd, check=True, capture_output=True)
            ray.init(address="auto", **kwargs)
            print("started a local Ray head for long-lived actors (stop it with `ray stop`)")
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return ray.get_runtime_context().gcs_address


def _ray_cli() -> str:
    """The `ray` script of this interpreter's environment (the venv may not be on PATH)."""
    import sys
    from pathlib import Path

    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def try_connect(address: str | None) -> bool:
    """Join a running cluster if there is one (never start Ray); False if none is reachable."""
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, ignore_reinit_error=True)
    except ConnectionError:
        return False
    return True
