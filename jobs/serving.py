"""Ray + Serve start-up for the student service: Ray settings first, then Ray, then the application.

Serve reads its tuning switches from the environment of the Ray processes (controller, proxy,
replicas), so they must be set before a local Ray starts; an existing cluster keeps the settings
it was started with (start it with the same variables: see docs/benchmarks.md and the README).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from exfm_ray.serving.config import ServeConfig

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
}


def configure_ray_env(fast_ingress: bool) -> dict[str, str]:
    """Put the Serve tuning variables into this process's environment (a local Ray inherits it).

    A variable the user already set wins. Returns what is in effect.
    """
    if not fast_ingress:
        return {}
    for key, value in FAST_INGRESS_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in FAST_INGRESS_ENV}


def start_ray(address: str | None, *, fast_ingress: bool, num_cpus: int | None = None) -> None:
    import ray

    if address is None:
        configure_ray_env(fast_ingress)
        _workers_import_this_checkout()
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def _workers_import_this_checkout() -> None:
    """Ray workers inherit the environment, not sys.path: point them at the exfm_ray this driver runs.

    Without it, a worker could import another checkout of the package (e.g. an editable install).
    """
    import exfm_ray

    root = str(Path(exfm_ray.__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for benchmarks and tests that run beside other services)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def deploy(config: ServeConfig) -> str:
    """Start Serve's HTTP ingress on config.host:port and (re)deploy the student app; returns its URL."""
    from ray import serve

    from exfm_ray.serving.app import build_app

    serve.start(http_options={"host": config.host, "port": config.port}, logging_config=config.logging_config())
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    return config.url


def shutdown(config: ServeConfig, *, own_cluster: bool) -> None:
    """Stop what we started: all of Serve and Ray on our own local Ray, only our app on a shared cluster."""
    import ray
    from ray import serve

    if own_cluster:
        serve.shutdown()
    else:
        serve.delete(config.app_name)
    ray.shutdown()
