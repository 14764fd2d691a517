"""Deploying the student application on the Ray this process has joined, and taking it down."""

from __future__ import annotations

import socket

from exfm_ray.serving.config import ServeConfig


def deploy(config: ServeConfig) -> str:
    """Start Serve's HTTP ingress on config.host:port and (re)deploy the student app; returns its URL."""
    from ray import serve

    from exfm_ray.serving.app import build_app

    serve.start(http_options={"host": config.host, "port": config.port}, logging_config=config.logging_config())
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    return config.url


def undeploy(config: ServeConfig, *, all_of_serve: bool) -> None:
    """Stop what we started: all of Serve on our own Ray, only our app on a shared cluster."""
    from ray import serve

    if all_of_serve:
        serve.shutdown()
    else:
        serve.delete(config.app_name)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for benchmarks and tests that run beside other services)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
