"""What a published student says about itself (`meta.json`), read without torch: the tenant
manager, the CLI and Serve's router look at versions, windows and metrics, never at weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.errors import ExfmError
from exfm_ray.schema import SparseFeature, StreamSpec
from exfm_ray.students.config import DEFAULT_VARIANT, StudentConfig

META_FILE = "meta.json"


class StudentMeta(Config):
    tenant: str = Field(description="Tenant the student serves.")
    version: str = Field(description="Checkpoint version, unique per tenant; increases with training.")
    window: int = Field(description="Last window trained on.")
    features: list[SparseFeature] = Field(description="Sparse inputs, in model order.")
    dense: list[str] = Field(default_factory=list, description="Dense inputs, in model order.")
    student: StudentConfig = Field(description="Size dial the weights were built with.")
    fm_versions: list[str] = Field(default_factory=list, description="FM versions whose labels it learned from.")
    metrics: dict[str, float | None] = Field(default_factory=dict, description="Evaluation metrics at export.")
    variant: str = Field(DEFAULT_VARIANT, description="Distillation variant used in training.")
    served: str = Field(
        "exfm",
        description="Which model the guard published: exfm (the ExFM student), blend (the mean of its and the "
        "control's probabilities), control (the twin trained without the FM) or base_rate.",
    )
    guard_reason: str = Field("", description="Why the guard chose it (trailing NE of each candidate).")
    fm_dim: int = Field(
        0, ge=0, description="FM embedding size of the LoopFM histories the student reads (0: it reads none)."
    )
    store_version: int | None = Field(
        None, description="LoopFM store version its last training window read (Serve reads the newest)."
    )

    def schema_hash(self) -> str:
        """Identifies the input schema: a server can refuse a checkpoint whose inputs changed."""
        text = json.dumps([[f.name, f.cardinality, f.multi_valued] for f in self.features] + [self.dense])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def student_meta(spec: StreamSpec, tenant: str, cfg: StudentConfig, **fields) -> StudentMeta:
    t = spec.tenant(tenant)
    features = [spec.feature(f) for f in t.features]
    return StudentMeta(tenant=tenant, features=features, dense=list(t.dense), student=cfg, **fields)


def read_meta(path: str | Path) -> StudentMeta:
    file = Path(path) / META_FILE
    if not file.exists():
        raise ExfmError(f"{path} is not a student checkpoint: no {META_FILE}")
    return StudentMeta.model_validate_json(file.read_text())
