"""A tenant's config (what `exfm tenants add NAME --config tenant.yaml` reads) and its row view.

A tenant is one student: a product surface x task. It learns from the rows that some stream
tenants logged (`rows`, default: the stream tenant of the same name), sees a subset of the
features, and carries its own size and distillation knobs. Validation against the stream spec
names the field at fault, so a bad YAML never reaches a trainer.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.errors import ConfigError
from exfm_ray.experiment.config import KnobsConfig
from exfm_ray.schema import FM_LOGIT, FM_MASK, StreamSpec, TenantSpec, label_column
from exfm_ray.students.config import DEFAULT_VARIANT, StudentConfig, variant
from exfm_ray.students.store import valid_name

# '<variant>+loopfm': that variant also reading the FM's past embeddings of the row's entities
# from the run's LoopFM store ('loopfm' alone: the student without distillation, with the store).
Variant = Literal[
    "vm_only", "kd_single_head", "kd_sa", "ah", "ah_sa",
    "loopfm", "kd_single_head+loopfm", "kd_sa+loopfm", "ah+loopfm", "ah_sa+loopfm",
]  # fmt: skip


class TenantConfig(Config):
    name: str = Field(description="Tenant id (letters, digits, '_', '.', '-'); names its student everywhere.")
    rows: list[str] | None = Field(
        None, description="Stream tenants whose rows this student learns from; default: the one named `name`."
    )
    features: list[str] | None = Field(
        None, description="Sparse features the student sees; default: those every source tenant logs."
    )
    dense: list[str] | None = Field(None, description="Dense features; default: those every source tenant logs.")
    task: str | None = Field(None, description="Label task (label_<task>); default: the source tenants' task.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="Student size and optimizer.")
    variant: Variant = Field(DEFAULT_VARIANT, description="How the student learns from the FM (vm_only = not at all).")
    knobs: KnobsConfig = Field(default_factory=KnobsConfig, description="Distillation knobs w, beta, alpha, w_sa.")
    control: bool = Field(
        False,
        description="Also train a student without the FM on the same batches, to report what the FM adds "
        "(always on with the guard).",
    )
    guard: bool = Field(
        True,
        description="Do-no-harm guard: after each window serve whichever of the ExFM student, the student "
        "alone (control) and the constant base rate had the lowest NE over the trailing windows.",
    )
    guard_windows: int = Field(3, ge=1, description="Trailing windows the guard pools to compare the candidates.")
    workers: int = Field(1, ge=1, le=64, description="Ray Train workers (data parallel) of this tenant's run.")
    own_run: bool = Field(
        False,
        description="A Ray Train run of its own even with one worker (a big or slow tenant: a shared run "
        "trains its tenants' windows one after another, so its windows would delay the others').",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description='Custom resources per worker, e.g. {"student_pool": 1} (isolation).'
    )
    threads_per_worker: int = Field(1, ge=1, description="torch threads per worker.")
    max_failures: int = Field(3, ge=0, description="Worker failures the run recovers from (from the state files).")
    seed: int = Field(0, description="Seed of initialization and batch order.")

    def distill(self):
        return variant(self.variant, **self.knobs.model_dump())

    @property
    def trains_control(self) -> bool:
        return self.control or self.guard


class TenantView(Config):
    """A tenant config resolved against a stream: what its trainer reads and how."""

    tenant: TenantConfig = Field(description="The tenant's config.")
    sources: list[str] = Field(description="Stream tenants whose rows it reads.")
    spec: StreamSpec = Field(description="A one-tenant spec over exactly the student's inputs and task.")

    @property
    def columns(self) -> list[str]:
        """Columns of an augmented window the trainer reads."""
        t = self.spec.tenants[0]
        base = ["example_id", "event_time", "tenant", label_column(t.task), *t.features, *t.dense]
        return [*base, FM_LOGIT, FM_MASK, "fm_version"]

    def select(self, table: pa.Table) -> pa.Table:
        """This tenant's rows of an augmented window, relabeled as its own (stream order kept)."""
        rows = table.filter(pc.is_in(table.column("tenant"), value_set=pa.array(self.sources)))
        i = rows.column_names.index("tenant")
        return rows.set_column(i, "tenant", pa.array([self.tenant.name] * rows.num_rows, pa.string()))


def resolve(cfg: TenantConfig, spec: StreamSpec) -> TenantView:
    """Check a tenant config against the stream; ConfigError names the tenant and the field."""

    def fail(field: str, msg: str) -> ConfigError:
        return ConfigError(f"tenant {cfg.name!r}: field {field!r}: {msg}")

    if not valid_name(cfg.name):
        raise fail("name", "use only letters, digits, '_', '.', '-'")
    sources = cfg.rows or [cfg.name]
    unknown = [s for s in sources if s not in spec.tenant_names]
    if unknown:
        what = "no stream tenant is named like it; set `rows`" if cfg.rows is None else "unknown stream tenants"
        raise fail("rows", f"{what} {unknown}; the stream has {spec.tenant_names}")
    src = [spec.tenant(s) for s in sources]
    features = cfg.features or [f for f in spec.sparse_names if all(f in s.features for s in src)]
    dense = cfg.dense if cfg.dense is not None else [d for d in spec.dense if all(d in s.dense for s in src)]
    bad = [f for f in features if f not in spec.sparse_names]
    if bad:
        raise fail("features", f"unknown features {bad}; the stream has {spec.sparse_names}")
    if not features:
        raise fail("features", "the student needs at least one sparse feature")
    if len(set(features)) != len(features):
        raise fail("features", "a feature is listed twice")
    bad = [d for d in dense if d not in spec.dense]
    if bad:
        raise fail("dense", f"unknown dense features {bad}; the stream has {spec.dense}")
    if cfg.distill().loopfm:
        keys = cfg.student.loopfm.store.keys
        if [k for k in keys if k not in features]:
            # a Serve request carries the tenant's features only: the entity must be one of them
            raise fail("student.loopfm.store.keys", f"{keys} must be among the student's features {features}")
    tasks = {s.task for s in src}
    task = cfg.task or (tasks.pop() if len(tasks) == 1 else None)
    if task is None:
        raise fail("task", f"the source tenants have different tasks {sorted({s.task for s in src})}; pick one")
    if task not in spec.tasks:
        raise fail("task", f"unknown task {task!r}; the stream has {spec.tasks}")
    view_spec = StreamSpec(
        name=f"{spec.name}:{cfg.name}",
        description=f"rows of {sources} as seen by tenant {cfg.name}",
        sparse=[f for f in spec.sparse if f.name in features],
        dense=list(dense),
        tasks=[task],
        tenants=[TenantSpec(name=cfg.name, task=task, features=list(features), dense=list(dense))],
        window_starts=spec.window_starts,
    )
    return TenantView(tenant=cfg, sources=sources, spec=view_spec)
