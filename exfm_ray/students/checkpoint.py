"""Student checkpoints: the serving path's weights plus the metadata needed to rebuild and trust it.

A checkpoint folder holds `serving.pt` (state dict of ServingStudent: no aux head, no adapter)
and `meta.json` (StudentMeta). Training state (optimizer, aux heads, adapter) is saved separately
by the trainers that resume; serving never loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.errors import ExfmError
from exfm_ray.schema import StreamSpec
from exfm_ray.students.config import DEFAULT_VARIANT, StudentConfig
from exfm_ray.students.model import ServingStudent, Student, serving_parts

SERVING_FILE = "serving.pt"
META_FILE = "meta.json"


class FeatureInfo(Config):
    name: str = Field(description="Sparse feature name.")
    cardinality: int = Field(gt=0, description="Ids lie in [0, cardinality).")
    multi_valued: bool = Field(False, description="Several ids per row allowed (mean pooling).")


class StudentMeta(Config):
    tenant: str = Field(description="Tenant the student serves.")
    version: str = Field(description="Checkpoint version, unique per tenant; increases with training.")
    window: int = Field(description="Last window trained on.")
    features: list[FeatureInfo] = Field(description="Sparse inputs, in model order.")
    dense: list[str] = Field(default_factory=list, description="Dense inputs, in model order.")
    student: StudentConfig = Field(description="Size dial the weights were built with.")
    fm_versions: list[str] = Field(default_factory=list, description="FM versions whose labels it learned from.")
    metrics: dict[str, float | None] = Field(default_factory=dict, description="Evaluation metrics at export.")
    variant: str = Field(DEFAULT_VARIANT, description="Distillation variant used in training.")
    served: str = Field(
        "exfm", description="Which model the guard published: exfm (the ExFM student), control or base_rate."
    )
    guard_reason: str = Field("", description="Why the guard chose it (trailing NE of each candidate).")

    def schema_hash(self) -> str:
        """Identifies the input schema: a server can refuse a checkpoint whose inputs changed."""
        text = json.dumps([[f.name, f.cardinality, f.multi_valued] for f in self.features] + [self.dense])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def student_meta(spec: StreamSpec, tenant: str, cfg: StudentConfig, **fields) -> StudentMeta:
    t = spec.tenant(tenant)
    features = [FeatureInfo(**spec.feature(f).model_dump()) for f in t.features]
    return StudentMeta(tenant=tenant, features=features, dense=list(t.dense), student=cfg, **fields)


def save_student(student: Student | ServingStudent, meta: StudentMeta, path: str | Path) -> Path:
    """Write the serving checkpoint atomically: a reader sees the old folder or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    serving = student.serving_model() if isinstance(student, Student) else student
    torch.save(serving.state_dict(), tmp / SERVING_FILE)
    (tmp / META_FILE).write_text(meta.model_dump_json(indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_meta(path: str | Path) -> StudentMeta:
    file = Path(path) / META_FILE
    if not file.exists():
        raise ExfmError(f"{path} is not a student checkpoint: no {META_FILE}")
    return StudentMeta.model_validate_json(file.read_text())


def load_serving(path: str | Path) -> tuple[ServingStudent, StudentMeta]:
    """Rebuild the serving model from a checkpoint: only the serving path's classes are used."""
    meta = read_meta(path)
    cards = {f.name: f.cardinality for f in meta.features}
    multi = {f.name for f in meta.features if f.multi_valued}
    parts = serving_parts([f.name for f in meta.features], cards, multi, len(meta.dense), meta.student)
    model = ServingStudent(*parts)
    model.load_state_dict(torch.load(Path(path) / SERVING_FILE, weights_only=True))
    model.eval()
    return model, meta
