"""ServeConfig: everything the student service needs, validated once, passed to every replica."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from exfm_ray.configbase import Config


class AutoscalingSettings(Config):
    """Replica autoscaling (Ray Serve `autoscaling_config`); replaces a fixed `num_replicas`."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(2, ge=1, description="Most replicas started under load.")
    target_ongoing_requests: float = Field(
        32, gt=0, description="Ongoing requests per replica the autoscaler aims for (batching wants several)."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must stay high this long before adding a replica.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load must stay low this long before removing one.")

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump()


class ServeConfig(Config):
    store_root: Path = Field(description="StudentStore root: serving reads <root>/students/<tenant>/LATEST.json.")
    host: str = Field("127.0.0.1", min_length=1, description="Bind address; loopback unless set (0.0.0.0 = all).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the ingress.")
    app_name: str = Field("students", min_length=1, description="Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="Route prefix of the application.")
    num_replicas: int = Field(1, ge=1, description="Replicas when autoscaling is off.")
    autoscaling: AutoscalingSettings | None = Field(None, description="Autoscale replicas instead of num_replicas.")
    replica_cpus: float = Field(1.0, gt=0, description="Logical CPUs reserved per replica.")
    replica_resources: dict[str, float] = Field(
        default_factory=dict, description='Custom resources per replica, e.g. {"serve_pool": 0.1}: Serve nodes only.'
    )
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests a replica accepts at once; must exceed what one batch gathers."
    )
    max_models_per_replica: int = Field(32, ge=1, description="Tenant models a replica keeps (LRU beyond this).")
    max_batch_rows: int = Field(1024, ge=1, description="Rows one batched forward pass may take (@serve.batch).")
    batch_wait_s: float = Field(
        0.0,
        ge=0,
        le=1.0,
        description="How long a batch waits for more requests; 0 = take what queued while the last batch ran.",
    )
    solo_fast_path: bool = Field(
        True,
        description="A request with no other in flight on its replica runs at once, not through the "
        "@serve.batch queue (a batch of one either way; the queue costs about 0.3 ms).",
    )
    max_rows_per_request: int = Field(512, ge=1, description="Larger requests get 422.")
    reload_interval_s: float = Field(
        2.0, gt=0, description="How often a replica checks LATEST.json of its loaded tenants for a newer version."
    )
    torch_threads: int = Field(1, ge=1, description="Intra-op threads per replica (small models: 1 is fastest).")
    access_log: bool = Field(False, description="Serve access log per request (costs latency).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", description="Replica log level.")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.max_rows_per_request > self.max_batch_rows:
            raise ValueError("max_rows_per_request must be <= max_batch_rows (a request is never split)")
        return self

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"

    def logging_config(self) -> dict[str, Any]:
        return {"enable_access_log": self.access_log, "log_level": self.log_level}
