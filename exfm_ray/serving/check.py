"""The serving check at the end of `exfm run`: every tenant's newest checkpoint answers over HTTP
through Ray Serve, equal to the same student in this process, with its latency."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from exfm_ray.bench.http_load import post_until, sequential
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.batching import WindowTensors
from exfm_ray.schema import StreamSpec
from exfm_ray.serving.config import ServeConfig
from exfm_ray.serving.schema import PREDICT_PATH
from exfm_ray.students.checkpoint import load_serving
from exfm_ray.students.store import StudentStore
from exfm_ray.tenants.config import resolve
from exfm_ray.tenants.registry import TenantRegistry


def check_serving(
    storage: Path,
    serve: ServeConfig,
    spec: StreamSpec,
    tenants: list[str],
    *,
    sample_rows: int,
    latency_requests: int,
    reload_timeout_s: float = 60.0,
) -> dict:
    """Per tenant: the served version, the largest gap to the in-process student, p50/p99 ms."""
    store, augmented = StudentStore(storage), AugmentedStore(storage)
    last = max(augmented.committed())
    out = {}
    for tenant in tenants:
        pub = store.latest(tenant)
        if pub is None:
            continue
        view = resolve(TenantRegistry(storage).get(tenant).config, spec)
        table = view.select(augmented.read_window(last, columns=view.columns)).slice(0, sample_rows)
        url = serve.url + PREDICT_PATH.format(tenant=tenant)
        body = {"rows": http_rows(table, view)}
        # Serve hot-reloads a new checkpoint within its reload interval: ask until it answers with it.
        answer = post_until(
            url, body, accept=lambda a, v=pub.version: a.get("version") == v, timeout_s=reload_timeout_s
        )
        model, meta = load_serving(pub.path)
        rows = WindowTensors(table, view.spec)
        feats, dense = view.spec.tenants[0].features, view.spec.tenants[0].dense
        batch = rows.batch(0, rows.num_rows, feats, dense)
        history = _history(storage, model, meta.student.loopfm.store, answer.get("store_version"), table)
        expected = model(batch.sparse, batch.dense, history).detach().numpy()
        one = {"rows": body["rows"][:1]}
        latencies = asyncio.run(sequential(url, one, latency_requests, warmup=0)).samples_ms
        out[tenant] = {
            "version": answer["version"],
            "store_version": answer.get("store_version"),
            "rows": table.num_rows,
            "max_abs_diff": float(np.max(np.abs(np.asarray(answer["probabilities"]) - expected))),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
        }
    return {"url": serve.url, "tenants": out}


def _history(storage: Path, model, own, version: int | None, table):
    """What a LoopFM student reads for these rows from the store version the server used."""
    if model.loop is None or version is None:
        return None
    import torch

    from exfm_ray.loopfm.builder import store_root
    from exfm_ray.loopfm.features import history_columns
    from exfm_ray.loopfm.store import StoreReader, entity_ids

    view = StoreReader.open(store_root(storage)).version_view(version)
    hist, kept = history_columns(view, own.keys, {k: entity_ids(table, k) for k in own.keys}, own.k)
    return torch.from_numpy(hist), torch.from_numpy(kept)


def http_rows(table, view) -> list[dict]:
    """A tenant's rows as the predict route takes them (its own sparse and dense features)."""
    tenant = view.spec.tenants[0]
    sparse = {f: table.column(f).to_pylist() for f in tenant.features}
    dense = {d: table.column(d).to_pylist() for d in tenant.dense}
    return [
        {"sparse": {f: sparse[f][i] for f in tenant.features}, "dense": {d: dense[d][i] for d in tenant.dense}}
        for i in range(table.num_rows)
    ]
