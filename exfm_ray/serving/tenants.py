"""A tenant's loaded student (serving path only) and how serving finds it in the StudentStore."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from exfm_ray.errors import TenantNotFound
from exfm_ray.serving.rows import EncodedRows, RowSpec, to_batch
from exfm_ray.serving.schema import TenantInfo, TenantsResponse
from exfm_ray.students.checkpoint import load_serving
from exfm_ray.students.meta import StudentMeta, read_meta
from exfm_ray.students.model import ServingStudent
from exfm_ray.students.store import Published, StudentStore, valid_name


@dataclass(frozen=True)
class TenantModel:
    """One published version of a tenant's student, ready to answer. Immutable: a reload makes a new one."""

    tenant: str
    version: str
    published_at: float
    model: ServingStudent
    meta: StudentMeta
    spec: RowSpec

    def predict(self, parts: Sequence[EncodedRows]) -> list[float]:
        """Probabilities of all rows of `parts`, in order, from one forward pass."""
        sparse, dense = to_batch(parts, self.spec)
        with torch.inference_mode():
            return self.model(sparse, dense).tolist()


class TenantSlot:
    """The model a replica currently serves for a tenant; the reloader swaps `current` in place.

    Requests take `current` once and keep that snapshot, so a swap never mixes two versions
    inside one request and never fails one.
    """

    def __init__(self, current: TenantModel):
        self.current = current


def latest(store: StudentStore, tenant: str) -> Published:
    pub = store.latest(tenant) if valid_name(tenant) else None
    if pub is None:
        raise TenantNotFound(tenant)
    return pub


def load_published(pub: Published) -> TenantModel:
    model, meta = load_serving(pub.path)
    return TenantModel(pub.tenant, pub.version, pub.published_at, model, meta, RowSpec.from_meta(meta))


def load_tenant(store: StudentStore, tenant: str) -> TenantModel:
    """The tenant's latest published student; TenantNotFound if it has none."""
    return load_published(latest(store, tenant))


def list_tenants(store: StudentStore) -> TenantsResponse:
    infos = []
    for tenant in store.tenants():
        pub = store.latest(tenant)
        if pub is None:  # unpublished between the listing and the read
            continue
        meta = read_meta(pub.path)
        infos.append(
            TenantInfo(
                tenant=tenant,
                version=pub.version,
                published_at=pub.published_at,
                features=[f.name for f in meta.features],
                dense=list(meta.dense),
            )
        )
    return TenantsResponse(tenants=infos)
