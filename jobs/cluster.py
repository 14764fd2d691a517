"""Joining Ray, the one way every command does it: an existing cluster (--address /
EXFM_RAY_ADDRESS / `ray job submit`), or a local one. Only jobs/ start or join Ray; the library
never does.

Serve reads its tuning switches from the environment of the Ray processes (controller, proxy,
replicas), so they are set here before a local Ray starts; an existing cluster keeps the settings
it was started with (start it with the same variables: see docs/benchmarks.md and the README).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import ray

NAMESPACE = "exfm"

# Each line was measured on its own; docs/benchmarks.md has the numbers.
FAST_INGRESS_ENV = {
    # HAProxy (C) replaces the Python proxy actor: client -> HAProxy -> the replica's own HTTP server.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # User code on the replica's main event loop (no thread hop per request), buffered request logs.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ...but keep the handle router on its own loop: jobs and tests call handles from plain code.
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    # HAProxy health-checks replicas itself; the 30 s default drain is meant for external balancers.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Replay a request whose replica died before answering on another replica. Predictions are
    # idempotent, so a replay is safe; Serve's default retries connection failures only.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response response-timeout 502 503 504",
    "RAY_SERVE_HAPROXY_RETRIES": "3",
    # One log line per request to a socket that a Python actor parses into Serve's HTTP metrics:
    # ~130 us of CPU per request on the serving machine. HAProxy's own counters stay (port 9101).
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # Tenant-aware routing: HAProxy hashes the request path (/v1/tenants/<tenant>/predict), so each
    # tenant's requests go to one replica and each replica loads about tenants/replicas students
    # instead of every one (its LRU thrashed past max_models_per_replica). A tenant with more traffic
    # than one replica takes is the price; HAProxy remaps a tenant when its replica goes down.
    "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": "uri",
}


def connect(
    address: str | None = None,
    *,
    persistent: bool = False,
    num_cpus: int | None = None,
    fast_ingress: bool = False,
    serve_port: int | None = None,
) -> bool:
    """Join Ray; True when this process started its own Ray (it ends with this process).

    address None: join the cluster this process belongs to (`ray job submit` sets RAY_ADDRESS);
    else a persistent local head (for long-lived actors such as the FM group: a `ray start`
    cluster, started here if there is none, stopped with `ray stop`); else an embedded Ray.
    fast_ingress: Serve's tuning variables for a Ray started here (see FAST_INGRESS_ENV).
    serve_port: a Ray started here will serve HTTP on it: first clear what a killed run left there.
    """
    # Ray's own notices (start-up, auth token, worker counts) stay in its log files; errors still show.
    kwargs = {"namespace": NAMESPACE, "log_to_driver": False, "ignore_reinit_error": True,
              "logging_level": logging.ERROR}  # fmt: skip
    _quiet_ray_console(serve=fast_ingress or serve_port is not None)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return False
    if fast_ingress:
        configure_ray_env()
    if serve_port is not None:
        from exfm_ray.serving.ports import clear_leftovers

        clear_leftovers([serve_port, *_haproxy_ports()])
    _workers_import_this_checkout()
    if persistent:
        try:  # a local cluster started earlier with `ray start`
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            cmd = [_ray_cli(), "start", "--head", "--disable-usage-stats", "--include-dashboard=false"]
            if num_cpus:
                cmd.append(f"--num-cpus={num_cpus}")
            subprocess.run(cmd, check=True, capture_output=True)
            ray.init(address="auto", **kwargs)
            print("started a local Ray head for long-lived actors (stop it with `ray stop`)")
        return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


def try_connect(address: str | None) -> bool:
    """Join a running cluster if there is one (never start Ray); False if none is reachable."""
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    _quiet_ray_console(serve=False)
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, ignore_reinit_error=True,
                 logging_level=logging.ERROR)  # fmt: skip
    except ConnectionError:
        return False
    return True


def configure_ray_env() -> dict[str, str]:
    """Put the Serve tuning variables into this process's environment (a local Ray inherits it).

    A variable the user already set wins. Returns what is in effect.
    """
    for key, value in FAST_INGRESS_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in FAST_INGRESS_ENV}


def _workers_import_this_checkout() -> None:
    """Ray workers inherit the environment, not sys.path: point them at the exfm_ray this driver runs.

    Without it, a worker could import another checkout of the package (e.g. an editable install).
    """
    import exfm_ray

    root = str(Path(exfm_ray.__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def _ray_cli() -> str:
    """The `ray` script of this interpreter's environment (the venv may not be on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def _haproxy_ports() -> list[int]:
    """HAProxy's stats and metrics ports (Serve's defaults unless set in the environment)."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return []
    return [int(os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", 8404)),
            int(os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", 9101))]  # fmt: skip


# Raylet notices the driver prints that say nothing to a user of exfm: many actors on few cores is
# how the loop runs on one machine (FM ranks, supervisors, tenant trainers, replicas).
_EXPECTED_NOTICES = (
    "PYTHON worker processes have been started",
    "ServeController.graceful_shutdown failed",  # Serve stopping as Ray stops, at exit
    "ServeController.listen_for_change failed",
)


def _quiet_ray_console(*, serve: bool) -> None:
    """Keep Ray's chatter in its log files (<ray temp dir>/session_latest/logs): a user reads our lines
    and bars. Anything Ray reports at ERROR, and every raylet notice but the expected ones, still shows."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # "Progress bars disabled" and the like
    if serve:
        import ray.serve  # noqa: F401  (it sets its logger to INFO on import: lower it after)

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    from ray._private import worker  # the driver's printer of raylet notices (no public switch)

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "exfm_filtered", False):
        return

    def filtered(data, *args, **kwargs):
        lines = [line for line in data.get("lines", []) if not any(n in line for n in _EXPECTED_NOTICES)]
        if lines:
            printer({**data, "lines": lines}, *args, **kwargs)

    filtered.exfm_filtered = True
    worker.print_to_stdstream = filtered
