"""Config of `exfm run`: the stream, the FM, the tenants and serving of one end-to-end run."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.data.sources import SourceConfig
from exfm_ray.fm.config import FMConfig
from exfm_ray.serving.config import ServeConfig
from exfm_ray.students.config import StudentConfig
from exfm_ray.tenants.config import TenantConfig
from exfm_ray.tenants.trainer import TENANTS_PER_RUN, YOUNG_FM_WAIT_MAX_S, YOUNG_FM_WAIT_S


class PipelineConfig(Config):
    source: SourceConfig = Field(default_factory=SourceConfig, description="The stream to replay, window by window.")
    storage: str = Field(description="Storage root: stream, FM registry, augmented windows, tenants, reports.")
    fm: FMConfig = Field(
        default_factory=lambda: FMConfig(batch_size=128),
        description="FM size and training settings; batch_size is per rank (2 ranks: global batches of 256).",
    )
    fm_delay: int = Field(1, ge=1, description="Window t is labeled by the FM trained through window t - fm_delay.")
    fm_workers: int = Field(2, ge=1, description="Ray Train workers (sharded ranks) of the FM training job.")
    fm_shards: int = Field(2, ge=1, description="Ranks of the FM group that labels for the DAS.")
    fm_group: str = Field("exfm-fm", description="FM group actor name; a running group of that name is reused.")
    fm_resources: dict[str, float] = Field(
        default_factory=dict, description='Custom resources per FM rank and FM trainer, e.g. {"fm_shard": 1}.'
    )
    tenants: list[TenantConfig] | None = Field(
        None, description="Tenants to register if absent; default: one per stream tenant, each with a control."
    )
    student: StudentConfig = Field(default_factory=StudentConfig, description="Student of the default tenants.")
    max_concurrent_tenants: int = Field(4, ge=1, description="Tenant training runs holding resources at a time.")
    tenants_per_run: int = Field(
        TENANTS_PER_RUN, ge=1, description="One-worker tenants one training run hosts at most."
    )
    young_fm_wait_s: float = Field(
        YOUNG_FM_WAIT_S,
        ge=0,
        le=YOUNG_FM_WAIT_MAX_S,
        description="How long a tenant judging the young FM waits for the posts of tenants "
        "other training runs are bringing to its first labeled window (docs/design.md).",
    )
    das_batch_size: int = Field(4096, gt=0, description="Rows per FM call in the DAS.")
    das_workers: int = Field(1, ge=1, description="DAS workers (each reads, labels and writes units of a window).")
    das_resources: dict[str, float] = Field(
        default_factory=dict, description='Custom resources per DAS worker, e.g. {"student_pool": 0.1}.'
    )
    serve: dict = Field(
        default_factory=dict, description="ServeConfig fields for the student service (port, host, replicas ...)."
    )
    sample_rows: int = Field(32, ge=1, description="Rows per tenant sent through HTTP at the end, checked in-process.")
    latency_requests: int = Field(200, ge=1, description="Single-row requests per tenant timed at the end.")

    @property
    def warmup(self) -> int:
        """Windows left out of averages: the first fm_delay have no FM label, the next is its first."""
        return self.fm_delay + 1

    def serve_config(self) -> ServeConfig:
        """The student service of this run, serving what the run publishes under its storage."""
        return ServeConfig.parse({"store_root": str(Path(self.storage).resolve()), **self.serve}, source="serve")
