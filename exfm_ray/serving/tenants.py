"""A tenant's loaded student (serving path only) and how serving finds it in the StudentStore."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from exfm_ray.errors import TenantNotFound
from exfm_ray.loopfm.store import StoreView
from exfm_ray.serving.histories import EntityVectors, NewestStore, entity_vectors, readable
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
    entities: EntityVectors | None = None  # a LoopFM student's store version (None: every entity unseen)

    @property
    def reads_store(self) -> bool:
        return self.model.loop is not None

    @property
    def store_version(self) -> int | None:
        return self.entities.version if self.entities is not None else None

    def with_store(self, store: StoreView | None) -> TenantModel:
        if not self.reads_store:
            return self
        own = self.meta.student.loopfm.store
        return replace(self, entities=entity_vectors(self.model.loop, store, own.keys, own.k))

    def wants(self, store: StoreView | None) -> bool:
        """A store version this LoopFM student can read and does not read yet."""
        keys = self.meta.student.loopfm.store.keys
        return self.reads_store and readable(store, keys) and self.store_version != store.version

    def predict(self, parts: Sequence[EncodedRows]) -> list[float]:
        """Probabilities of all rows of `parts`, in order, from one forward pass."""
        sparse, dense = to_batch(parts, self.spec)
        with torch.inference_mode():
            history = self.entities.lookup(parts) if self.entities is not None else None
            return self.model(sparse, dense, history).tolist()


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


def load_published(pub: Published, histories: NewestStore | None = None) -> TenantModel:
    model, meta = load_serving(pub.path)
    loaded = TenantModel(pub.tenant, pub.version, pub.published_at, model, meta, RowSpec.from_meta(meta))
    return loaded.with_store(histories.view()) if histories is not None and loaded.reads_store else loaded


def load_tenant(store: StudentStore, tenant: str, histories: NewestStore | None = None) -> TenantModel:
    """The tenant's latest published student (a LoopFM one with the newest store version);
    TenantNotFound if it has none."""
    return load_published(latest(store, tenant), histories)


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
