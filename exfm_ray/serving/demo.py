"""Synthetic students to serve when no tenant has trained one yet, and valid example rows.

Used by `exfm serve --demo`, the serving benchmark and the serving tests: every student is a real
`Student` with aux heads and adapter (variant ah_sa), trained briefly on a synthetic window and
published through the StudentStore, so serving sees exactly what training would publish.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.schema import StreamSpec
from exfm_ray.students.config import StudentConfig, variant
from exfm_ray.students.learner import StudentLearner
from exfm_ray.students.meta import StudentMeta, student_meta
from exfm_ray.students.model import Student, build_student
from exfm_ray.students.store import Published, StudentStore


def synthetic_spec_and_stream(num_tenants: int = 2, rows_per_window: int = 2000, seed: int = 0):
    stream = SyntheticStream(
        SyntheticConfig(num_windows=2, rows_per_window=rows_per_window, num_tenants=num_tenants, seed=seed)
    ).stream()
    return stream.spec, stream


def train_student(spec: StreamSpec, stream, tenant: str, *, seed: int = 0, steps: int | None = None) -> Student:
    """An ah_sa student after one pass (or `steps` batches) over window 0 of the synthetic stream."""
    torch.manual_seed(seed)
    cfg, distill = StudentConfig(), variant("ah_sa")
    student = build_student(spec, tenant, cfg, distill)
    learner = StudentLearner(student, cfg, distill)
    t = spec.tenant(tenant)
    batches = WindowTensors(stream.tenant_rows(0, tenant), spec).batches(cfg.batch_size, t.features, t.dense)
    for batch in batches[:steps]:
        learner.step(batch)
    student.eval()
    return student


def publish_synthetic_students(
    root: str | Path, *, num_tenants: int = 2, version: str = "demo-1", seed: int = 0
) -> list[Published]:
    """Train and publish one student per synthetic tenant under `root` (a StudentStore root)."""
    spec, stream = synthetic_spec_and_stream(num_tenants, seed=seed)
    store = StudentStore(root)
    published = []
    for i, tenant in enumerate(spec.tenant_names):
        student = train_student(spec, stream, tenant, seed=seed + i)
        meta = student_meta(spec, tenant, StudentConfig(), version=version, window=0, variant="ah_sa")
        published.append(store.publish(student, meta))
    return published


def example_rows(meta: StudentMeta, num_rows: int, seed: int = 0) -> list[dict]:
    """Valid request rows for a tenant's student: random ids in range, dense values in [0, 1)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        sparse = {f.name: [rng.randrange(f.cardinality)] for f in meta.features}
        dense = {d: round(rng.random(), 4) for d in meta.dense}
        rows.append({"sparse": sparse, "dense": dense})
    return rows


def publish_tenant_copies(root: str | Path, total: int) -> list[str]:
    """Grow a store to `total` tenants by republishing its students under new names ("feed_07"):
    many tenants for serving benchmarks without training each. Returns every tenant's name."""
    store = StudentStore(root)
    bases = store.tenants()
    names = list(bases)
    i = 0
    while len(names) < total:
        base = bases[i % len(bases)]
        model, meta = store.load_latest(base)
        name = f"{base}_{i:02d}"
        store.publish(model, meta.model_copy(update={"tenant": name}))
        names.append(name)
        i += 1
    return names[:total]


def publish_loopfm_pair(root: str | Path, *, entities: int, seed: int = 0) -> tuple[str, str]:
    """Two students of one synthetic tenant with `entities` users, to time the LoopFM lookup: the
    default variant, and the same with LoopFM, beside a store (under `root`) that holds K events of
    every user, so every request's lookup hits. Untrained: the timing does not depend on weights."""
    import numpy as np

    from exfm_ray.das.pipeline import fm_emb_dim
    from exfm_ray.fm.config import FMConfig
    from exfm_ray.loopfm.builder import store_root
    from exfm_ray.loopfm.store import RepresentationStore

    cfg = SyntheticConfig(num_windows=2, rows_per_window=200, num_tenants=1, num_users=entities, seed=seed)
    spec = SyntheticStream(cfg).stream().spec
    tenant, student = spec.tenant_names[0], StudentConfig()
    dim = fm_emb_dim(spec, FMConfig())
    store = RepresentationStore(store_root(root), student.loopfm.store, dim)
    users = np.tile(np.arange(entities, dtype=np.int64), student.loopfm.store.k)
    emb = np.random.default_rng(seed).normal(size=(len(users), dim)).astype(np.float32)
    store.fold_arrays(store.window + 1, {"user_id": (users, np.ones(len(users), bool))}, emb)
    names = (f"{tenant}_plain", f"{tenant}_loopfm")
    for name, v in zip(names, ("kd_sa", "kd_sa+loopfm"), strict=True):
        torch.manual_seed(seed)
        model = build_student(spec, tenant, student, variant(v), fm_dim=dim)
        meta = student_meta(spec, tenant, student, version="demo-1", window=0, variant=v)
        StudentStore(root).publish(model, meta.model_copy(update={"tenant": name}))
    return names
