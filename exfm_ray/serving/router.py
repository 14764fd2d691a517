"""StudentRouter: the Serve deployment, a plain class (app.py makes it a deployment).

Per replica: `@serve.multiplexed` keeps an LRU of tenant models (keyed by tenant), `@serve.batch`
gathers concurrent requests into batched forward passes (one pass per tenant model in a batch;
a request that finds nothing else in flight runs at once), and a reloader swaps in a tenant's
newer checkpoint when its LATEST.json moves.
Both decorators are applied in __init__ because their sizes come from ServeConfig.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from fastapi import FastAPI
from ray import serve
from torch import nn

from exfm_ray.observability import histogram
from exfm_ray.serving.api import build_api
from exfm_ray.serving.config import ServeConfig
from exfm_ray.serving.histories import NewestStore
from exfm_ray.serving.rows import EncodedRows, encode_rows
from exfm_ray.serving.schema import HealthResponse, PredictRequest, PredictResponse, TenantsResponse
from exfm_ray.serving.tenants import TenantModel, TenantSlot, latest, list_tenants, load_published, load_tenant
from exfm_ray.students.store import StudentStore

logger = logging.getLogger("ray.serve")

BatchResult = tuple[list[float], str, int | None] | Exception  # probabilities, version, store version


@dataclass(slots=True)
class BatchItem:
    """One request waiting for a forward pass. Emptied once answered: Serve's batch loop keeps its
    last batch referenced until the next one arrives, which would keep an evicted model alive."""

    model: TenantModel | None
    encoded: EncodedRows | None


class StudentRouter:
    """Answers every tenant from one replica pool.

    Args:
        config: the service's ServeConfig (store root, LRU size, batch size, reload interval).
    """

    def __init__(self, config: ServeConfig):
        self.config = config
        self.store = StudentStore(config.store_root)
        self.histories = NewestStore(config.store_root)
        torch.set_num_threads(config.torch_threads)
        # Slots the LRU still holds (weak: an evicted tenant drops out of reload checks by itself).
        self._slots: weakref.WeakValueDictionary[str, TenantSlot] = weakref.WeakValueDictionary()
        self._reloader: asyncio.Task | None = None
        self._in_flight = 0
        self.batches = 0  # forward passes, including solo ones
        self.batched_rows = 0
        self.solo = 0  # requests answered without the queue
        self.loads: Counter[str] = Counter()  # student loads per tenant (a reload counts too)

        async def load(tenant: str) -> TenantSlot:
            slot = TenantSlot(await asyncio.to_thread(load_tenant, self.store, tenant, self.histories))
            self.loads[tenant] += 1
            self._slots[tenant] = slot
            return slot

        async def run_batch(items: list[BatchItem]) -> list[BatchResult]:
            return self._run_batch(items)

        self._slot = serve.multiplexed(max_num_models_per_replica=config.max_models_per_replica)(load)
        self._batched = serve.batch(
            max_batch_size=config.max_batch_rows,
            batch_wait_timeout_s=config.batch_wait_s,
            batch_size_fn=_rows_in,
        )(run_batch)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    async def predict(self, tenant: str, request: PredictRequest) -> PredictResponse:
        started = time.perf_counter()
        if tenant not in self._slots:
            # Refuse unknown tenants before the LRU loader, which would log each miss as a load failure.
            await asyncio.to_thread(latest, self.store, tenant)
        self._start_reloader()
        slot = await self._slot(tenant)
        # The LRU may still hold a slot dropped from reload checks when the tenant was unpublished.
        self._slots.setdefault(tenant, slot)
        model = slot.current
        encoded = encode_rows(request.rows, model.spec, self.config.max_rows_per_request)
        result = await self._answer(BatchItem(model, encoded))
        if isinstance(result, Exception):
            raise result
        probabilities, version, store_version = result
        # Per-tenant latency inside the replica (Serve's own metrics are per deployment, not per tenant).
        histogram("serve_tenant_latency_s", "Predict latency in the replica, per tenant", ("tenant",)).observe(
            time.perf_counter() - started, {"tenant": tenant}
        )
        return PredictResponse(tenant=tenant, version=version, probabilities=probabilities, store_version=store_version)

    async def _answer(self, item: BatchItem) -> BatchResult:
        """Join a @serve.batch batch when other requests are in flight; alone, skip the queue.

        A lone request would form a batch of one anyway, and the queue (futures, tasks, per-batch
        metrics) costs about as much as the forward pass of a small student.
        """
        self._in_flight += 1
        try:
            # One turn of the event loop lets requests that arrived together register first.
            await asyncio.sleep(0)
            if self._in_flight == 1 and self.config.solo_fast_path:
                self.solo += 1
                return self._run_batch([item])[0]
            return await self._batched(item)
        finally:
            self._in_flight -= 1

    async def tenants(self) -> TenantsResponse:
        return await asyncio.to_thread(list_tenants, self.store)

    def health(self) -> HealthResponse:
        return HealthResponse(status="ok", loaded={t: s.current.version for t, s in list(self._slots.items())})

    async def inspect_process(self) -> dict:
        """What this replica process holds, for tests and operators (called through a deployment handle).

        `live_modules` counts every torch module alive in the process by class name: the check that
        serving holds no aux head, no adapter, no training Student and no foundation model.
        """
        gc.collect()
        live = Counter(type(o).__name__ for o in gc.get_objects() if isinstance(o, nn.Module))
        loaded = {
            tenant: {
                "version": slot.current.version,
                "class": type(slot.current.model).__name__,
                "modules": sorted(n for n, _ in slot.current.model.named_modules() if n),
                "parameters": sorted(slot.current.model.state_dict()),
            }
            for tenant, slot in list(self._slots.items())
        }
        return {
            "pid": os.getpid(),
            "loaded": loaded,
            "live_modules": dict(live),
            "batches": self.batches,
            "batched_rows": self.batched_rows,
            "solo": self.solo,
            "loads": dict(self.loads),
        }

    def _run_batch(self, items: list[BatchItem]) -> list[BatchResult]:
        """One forward pass per tenant model in the batch; a failing model fails only its own requests."""
        by_model: dict[int, list[BatchItem]] = {}
        for item in items:
            by_model.setdefault(id(item.model), []).append(item)
        results: dict[int, BatchResult] = {}
        for group in by_model.values():
            model = group[0].model
            assert model is not None
            parts = [item.encoded for item in group]
            try:
                probs = model.predict(parts)
            except Exception as exc:  # a broken checkpoint must not take other tenants' requests down
                logger.exception("forward pass of %s@%s failed", model.tenant, model.version)
                results.update((id(item), exc) for item in group)
                continue
            start = 0
            for item, part in zip(group, parts, strict=True):
                results[id(item)] = (probs[start : start + part.num_rows], model.version, model.store_version)
                start += part.num_rows
            self.batched_rows += start
        self.batches += 1
        answers = [results[id(item)] for item in items]
        for item in items:
            item.model = item.encoded = None
        return answers

    def _start_reloader(self) -> None:
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.get_running_loop().create_task(self._reload_forever())

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            try:
                await self._reload_once()
            except Exception:  # keep serving the versions we have; the next round tries again
                logger.exception("checking for new student checkpoints failed")

    async def _reload_once(self) -> None:
        # The snapshot is taken on the loop thread, which mutates the dict, and dropped on return:
        # held across the sleep, it would keep evicted tenants' models alive.
        loaded = list(self._slots.items())
        gone = await asyncio.to_thread(_reload_changed, self.store, loaded, self.histories)
        for tenant in gone:  # unpublished: the next request checks the store again and gets 404
            self._slots.pop(tenant, None)


def _reload_changed(store: StudentStore, loaded: list[tuple[str, TenantSlot]], histories: NewestStore) -> list[str]:
    """Swap in the published version of every loaded tenant whose LATEST.json moved, and the newest
    LoopFM store version where it moved (runs in a thread); returns the tenants no longer published."""
    gone = []
    view = None
    if any(slot.current.reads_store for _, slot in loaded):
        view = histories.view()
    for tenant, slot in loaded:
        pub = store.latest(tenant)
        if pub is None:
            gone.append(tenant)
        elif pub.version != slot.current.version:
            slot.current = load_published(pub, histories)  # one reference assignment: requests see old or new
            logger.info("tenant %s now served by version %s", tenant, pub.version)
        elif slot.current.wants(view):
            slot.current = slot.current.with_store(view)
            logger.info("tenant %s now reads LoopFM store version %s", tenant, view.version)
    return gone


def _rows_in(items: list[BatchItem]) -> int:
    return sum(item.encoded.num_rows for item in items if item.encoded is not None)
