"""The Serve application: StudentRouter as an ingress deployment, built from a ServeConfig.

`build_app(config)` is what jobs call; `app_builder` is the `import_path` target of
`deploy/serve_config.yaml` (Serve validates the YAML `args` into a ServeConfig).
Starting Ray and Serve (HTTP host/port, proxy mode) is the job's work, not this module's.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from exfm_ray.serving.config import ServeConfig
from exfm_ray.serving.router import StudentRouter

DEPLOYMENT_NAME = "StudentRouter"


def build_app(config: ServeConfig) -> Application:
    scaling = (
        {"autoscaling_config": config.autoscaling.to_serve()}
        if config.autoscaling is not None
        else {"num_replicas": config.num_replicas}
    )
    deployment = serve.deployment(
        serve.ingress()(StudentRouter),
        name=DEPLOYMENT_NAME,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replica_cpus, "resources": dict(config.replica_resources)},
        logging_config=config.logging_config(),
        **scaling,
    )
    return deployment.bind(config)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve `import_path` target (`exfm_ray.serving.app:app_builder`); `args` are ServeConfig fields."""
    return build_app(ServeConfig.parse(dict(args), source="serve application args"))
