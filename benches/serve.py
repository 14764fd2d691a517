"""`exfm bench serve`: plain FastAPI + uvicorn (baseline) vs the Ray Serve app, same student, same client.

Both servers run the same FastAPI app (exfm_ray/serving/api.py) over the same published students;
the baseline answers in its own process with no Ray, the Serve app through HAProxy, multiplexing
and @serve.batch. Sequential rounds alternate between the two servers, so background load on a
shared machine falls on both alike.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from exfm_ray.bench.http_load import Connection, Latency, concurrent, post_request, sequential
from exfm_ray.serving.config import ServeConfig
from exfm_ray.serving.demo import example_rows, publish_synthetic_students
from exfm_ray.students.store import StudentStore
from jobs import serving

PREDICT = "/v1/tenants/{tenant}/predict"


def run_serve_bench(
    *,
    requests: int,
    seconds: float,
    concurrency: int,
    rows: int,
    fast_ingress: bool,
    config: ServeConfig | None = None,
    rounds: int = 10,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="exfm-bench-") as tmp:
        tenants = [p.tenant for p in publish_synthetic_students(tmp, num_tenants=2)]
        cfg = (config or ServeConfig(store_root=Path(tmp))).replace(store_root=Path(tmp), port=serving.free_port())
        store = StudentStore(tmp)
        single = {"rows": example_rows(store.latest_meta(tenants[0]), 1)}
        bodies = {t: [{"rows": example_rows(store.latest_meta(t), rows, seed=i)} for i in range(8)] for t in tenants}
        baseline_port = serving.free_port()
        baseline = _start_baseline(cfg, baseline_port)
        try:
            serving.start_ray(None, fast_ingress=fast_ingress, num_cpus=2)
            settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
            try:
                urls = {"baseline": f"http://127.0.0.1:{baseline_port}", "serve": serving.deploy(cfg)}
                for url in urls.values():
                    asyncio.run(_wait_ready(url + PREDICT.format(tenant=tenants[0]), single))
                latency = asyncio.run(_sequential_rounds(urls, tenants[0], single, requests, rounds))
                before = _replica_stats(cfg)
                load = {name: asyncio.run(_load(url, bodies, rows, concurrency, seconds)) for name, url in urls.items()}
                after = _replica_stats(cfg)
            finally:
                serving.shutdown(cfg, own_cluster=True)
        finally:
            baseline.kill()
            baseline.join()
    b, s = latency["baseline"], latency["serve"]
    passes = max(1, after["batches"] - before["batches"])
    return {
        "baseline_p50_ms": round(b.p50, 3),
        "baseline_p99_ms": round(b.p99, 3),
        "serve_p50_ms": round(s.p50, 3),
        "serve_p99_ms": round(s.p99, 3),
        "p50_ratio": round(s.p50 / b.p50, 3),
        "p99_ratio": round(s.p99 / b.p99, 3),
        "batched_predictions_per_s": round(sum(x.predictions_per_s for x in load["serve"]), 1),
        "baseline_predictions_per_s": round(sum(x.predictions_per_s for x in load["baseline"]), 1),
        "serve_load_p50_ms": round(_merged(load["serve"]).p50, 3),
        "serve_load_p99_ms": round(_merged(load["serve"]).p99, 3),
        "serve_load_success_rate": min(x.success_rate for x in load["serve"]),
        "rows_per_forward_pass_under_load": round((after["batched_rows"] - before["batched_rows"]) / passes, 1),
        "sequential_requests": len(s.samples_ms),
        "load_seconds": seconds,
        "concurrency": concurrency,
        "rows_per_request": rows,
        "tenants": tenants,
        "ray_settings": settings,
        "serve_config": cfg.model_dump(mode="json", exclude={"store_root", "port"}),
    }


async def _sequential_rounds(urls: dict[str, str], tenant: str, body: dict, requests: int, rounds: int):
    """Alternate servers every round so a burst of background load hits both alike."""
    latency = {name: Latency([]) for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            got = await sequential(url + PREDICT.format(tenant=tenant), body, max(1, requests // rounds), warmup=20)
            latency[name].samples_ms += got.samples_ms
    return latency


async def _load(url: str, bodies: dict[str, list[dict]], rows: int, concurrency: int, seconds: float):
    """`concurrency` connections split over the tenants, each posting its tenant's requests back to back."""
    per_tenant = max(1, concurrency // len(bodies))
    return await asyncio.gather(
        *(concurrent(url + PREDICT.format(tenant=t), b, rows, per_tenant, seconds) for t, b in bodies.items())
    )


def _merged(loads) -> Latency:
    return Latency([v for x in loads for v in x.latency.samples_ms])


def _replica_stats(cfg: ServeConfig) -> dict:
    from ray import serve

    return serve.get_deployment_handle("StudentRouter", app_name=cfg.app_name).inspect_process.remote().result()


async def _wait_ready(url: str, body: dict, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        conn = Connection(url)
        try:
            if (await conn.request(post_request(url, body))).status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s} s")
        await asyncio.sleep(0.2)


def _serve_baseline(config_json: str, port: int) -> None:
    import uvicorn

    from exfm_ray.serving.direct import build_direct_api

    config = ServeConfig.model_validate_json(config_json)
    uvicorn.run(build_direct_api(config), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _start_baseline(cfg: ServeConfig, port: int) -> multiprocessing.Process:
    proc = multiprocessing.get_context("spawn").Process(
        target=_serve_baseline, args=(cfg.model_dump_json(), port), daemon=True
    )
    proc.start()
    return proc
