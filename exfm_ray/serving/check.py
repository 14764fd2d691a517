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
        model, _ = load_serving(pub.path)
        rows = WindowTensors(table, view.spec)
        feats, dense = view.spec.tenants[0].features, view.spec.tenants[0].dense
        batch = rows.batch(0, rows.num_rows, feats, dense)
        expected = model(batch.sparse, batch.dense).detach().numpy()
        one = {"rows": body["rows"][:1]}
        latencies = asyncio.run(sequential(url, one, latency_requests, warmup=0)).samples_ms
        out[tenant] = {
            "version": answer["version"],
            "rows": table.num_rows,
            "max_abs_diff": float(np.max(np.abs(np.asarray(answer["probabilities"]) - expected))),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
        }
    return {"url": serve.url, "tenants": out}


def http_rows(table, view) -> list[dict]:
    """A tenant's rows as the predict route takes them (its own sparse and dense features)."""
    tenant = view.spec.tenants[0]
    sparse = {f: table.column(f).to_pylist() for f in tenant.features}
    dense = {d: table.column(d).to_pylist() for d in tenant.dense}
    return [
        {"sparse": {f: sparse[f][i] for f in tenant.features}, "dense": {d: dense[d][i] for d in tenant.dense}}
        for i in range(table.num_rows)
    ]
