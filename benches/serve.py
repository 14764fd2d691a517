"""`exfm bench serve`: plain FastAPI + uvicorn (baseline) vs the Ray Serve app, same student, same client.

Both servers run the same FastAPI app (exfm_ray/serving/api.py) over the same published students;
the baseline answers in its own process with no Ray, the Serve app through HAProxy, multiplexing
and @serve.batch. Sequential rounds alternate between the two servers, so background load on a
shared machine falls on both alike.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile
from pathlib import Path

from pydantic import Field

from exfm_ray.bench.http_load import Latency, concurrent, post_until, sequential
from exfm_ray.configbase import Config
from exfm_ray.errors import ExfmError
from exfm_ray.serving.config import ServeConfig
from exfm_ray.serving.demo import (
    example_rows,
    publish_loopfm_pair,
    publish_synthetic_students,
    publish_tenant_copies,
)
from exfm_ray.serving.deploy import deploy, free_port, undeploy
from exfm_ray.serving.schema import PREDICT_PATH
from exfm_ray.students.store import StudentStore


class ServeBenchConfig(Config):
    requests: int = Field(4000, ge=1, description="Sequential single-row requests per server.")
    seconds: float = Field(10.0, gt=0, description="Duration of the concurrent load per server.")
    concurrency: int = Field(32, ge=1, description="Concurrent connections under load.")
    rows: int = Field(32, ge=1, description="Rows per request under load (candidates to rank).")
    rounds: int = Field(10, ge=1, description="Sequential rounds, alternating between the two servers.")
    tenants: int = Field(2, ge=1, le=512, description="Tenants served (beyond 2: copies of the two trained students).")
    serve: ServeConfig | None = Field(None, description="The Serve app's config (its store_root/port are replaced).")
    loopfm_entities: int = Field(100_000, ge=0, description="Users in the LoopFM store of the with/without-lookup "
                                 "arm (0: no such arm; it needs the bench's own students).")  # fmt: skip
    store_root: Path | None = Field(None, description="Serve the students published here (its first `tenants`) "
                                    "instead of publishing synthetic ones.")  # fmt: skip


def run(cfg: ServeBenchConfig) -> dict:
    """On the Ray this process has joined: deploys the app, measures, and takes the app down."""
    requests, seconds, concurrency, rows = cfg.requests, cfg.seconds, cfg.concurrency, cfg.rows
    with tempfile.TemporaryDirectory(prefix="exfm-bench-") as tmp:
        root = tmp if cfg.store_root is None else str(cfg.store_root)
        if cfg.store_root is None:
            publish_synthetic_students(root, num_tenants=min(cfg.tenants, 2))
            tenants = publish_tenant_copies(root, cfg.tenants)
            pair = publish_loopfm_pair(root, entities=cfg.loopfm_entities) if cfg.loopfm_entities else None
        else:
            tenants = StudentStore(root).tenants()[: cfg.tenants]
            if not tenants:
                raise ExfmError(f"no published student in {root}")
            pair = None
        serve_cfg = (cfg.serve or ServeConfig(store_root=Path(root))).replace(store_root=Path(root), port=free_port())
        store = StudentStore(root)
        single = {"rows": example_rows(store.latest_meta(tenants[0]), 1)}
        bodies = {t: [{"rows": example_rows(store.latest_meta(t), rows, seed=i)} for i in range(8)] for t in tenants}
        baseline_port = free_port()
        baseline = _start_baseline(serve_cfg, baseline_port)
        try:
            urls = {"baseline": f"http://127.0.0.1:{baseline_port}", "serve": deploy(serve_cfg)}
            for url in urls.values():
                post_until(url + PREDICT_PATH.format(tenant=tenants[0]), single, timeout_s=120.0)
            ones = {t: {"rows": example_rows(store.latest_meta(t), 1)} for t in tenants}
            latency = asyncio.run(_sequential_rounds(urls, tenants[0], single, requests, cfg.rounds, ones))
            lookup = _lookup(urls["serve"], store, pair, requests, cfg.rounds, cfg.loopfm_entities) if pair else {}
            before = _replica_stats(serve_cfg)
            load = {name: asyncio.run(_load(url, bodies, rows, concurrency, seconds)) for name, url in urls.items()}
            after = _replica_stats(serve_cfg)
        finally:
            undeploy(serve_cfg, all_of_serve=True)
            baseline.kill()
            baseline.join()
    b, s, every = latency["baseline"], latency["serve"], latency["serve_all_tenants"]
    passes = max(1, after["batches"] - before["batches"])
    return {
        "serve_all_tenants_p50_ms": round(every.p50, 3),
        "serve_all_tenants_p99_ms": round(every.p99, 3),
        "serve_p99_ratio": round(every.p99 / s.p99, 3),  # every tenant in turn vs one tenant, Serve
        "model_loads_per_replica": after["loads_per_replica"],
        "max_models_per_replica": after["max_models_per_replica"],
        **_pair("baseline", b, "serve", s, ratio=""),
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
        "serve_config": serve_cfg.model_dump(mode="json", exclude={"store_root", "port"}),
        **lookup,
    }


async def _sequential_rounds(
    urls: dict[str, str], tenant: str, body: dict, requests: int, rounds: int, every_tenant: dict[str, dict]
):
    """Alternate servers every round so a burst of background load hits both alike; each round also
    asks Serve for every tenant in turn (serve_all_tenants: what a replica that holds only its share
    of the students answers, against the one tenant of "serve")."""
    latency = {name: Latency([]) for name in [*urls, "serve_all_tenants"]}
    per_tenant = max(1, requests // rounds // len(every_tenant))
    for _ in range(rounds):
        for name, url in urls.items():
            got = await sequential(
                url + PREDICT_PATH.format(tenant=tenant), body, max(1, requests // rounds), warmup=20
            )
            latency[name].samples_ms += got.samples_ms
        for t, one in every_tenant.items():
            got = await sequential(urls["serve"] + PREDICT_PATH.format(tenant=t), one, per_tenant, warmup=1)
            latency["serve_all_tenants"].samples_ms += got.samples_ms
    return latency


def _lookup(url: str, store: StudentStore, pair: tuple[str, str], requests: int, rounds: int, entities: int) -> dict:
    """The same student without and with LoopFM on Serve, alternating each round; every request a
    single row of a user the store holds (a lookup that hits). p50/p99 of each and their ratio."""
    bodies = {name: {"rows": example_rows(store.latest_meta(name), 1)} for name in pair}
    for name in pair:
        answer = post_until(url + PREDICT_PATH.format(tenant=name), bodies[name], timeout_s=120.0)
        if name.endswith("_loopfm") and answer.get("store_version") is None:
            raise ExfmError("the LoopFM student answered without a store version: the lookup did not run")

    async def rounds_of_both() -> dict[str, Latency]:
        arms = {name: Latency([]) for name in pair}
        for r in range(rounds):
            for name in pair if r % 2 == 0 else pair[::-1]:  # neither arm always goes first
                got = await sequential(url + PREDICT_PATH.format(tenant=name), bodies[name],
                                       max(1, requests // rounds), warmup=20)  # fmt: skip
                arms[name].samples_ms += got.samples_ms
        return arms

    arms = asyncio.run(rounds_of_both())
    plain, loop = (arms[n] for n in pair)
    return {
        "loopfm_entities": entities,
        **_pair("lookup_off", plain, "lookup_on", loop, ratio="lookup_"),
    }


def _pair(base: str, a: Latency, arm: str, b: Latency, ratio: str) -> dict:
    """p50/p99 of a baseline and an arm measured in the same rounds, and the arm's ratios."""
    return {
        f"{base}_p50_ms": round(a.p50, 3),
        f"{base}_p99_ms": round(a.p99, 3),
        f"{arm}_p50_ms": round(b.p50, 3),
        f"{arm}_p99_ms": round(b.p99, 3),
        f"{ratio}p50_ratio": round(b.p50 / a.p50, 3),
        f"{ratio}p99_ratio": round(b.p99 / a.p99, 3),
    }


async def _load(url: str, bodies: dict[str, list[dict]], rows: int, concurrency: int, seconds: float):
    """`concurrency` connections split over the tenants, each posting its tenant's requests back to back."""
    per_tenant = max(1, concurrency // len(bodies))
    return await asyncio.gather(
        *(concurrent(url + PREDICT_PATH.format(tenant=t), b, rows, per_tenant, seconds) for t, b in bodies.items())
    )


def _merged(loads) -> Latency:
    return Latency([v for x in loads for v in x.latency.samples_ms])


def _replica_stats(cfg: ServeConfig) -> dict:
    """Summed over every replica: forward passes and rows; per replica: student loads and models held."""
    from ray import serve

    handle = serve.get_deployment_handle("StudentRouter", app_name=cfg.app_name)
    seen: dict[int, dict] = {}
    for _ in range(50 * cfg.num_replicas):  # calls spread over replicas: ask until each answered
        info = handle.inspect_process.remote().result()
        seen[info["pid"]] = info
        if len(seen) == cfg.num_replicas:
            break
    infos = list(seen.values())
    return {
        "batches": sum(i["batches"] for i in infos),
        "batched_rows": sum(i["batched_rows"] for i in infos),
        "loads_per_replica": [sum(i["loads"].values()) for i in infos],
        "max_models_per_replica": max(len(i["loaded"]) for i in infos),
    }


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


def summary(r: dict) -> str:
    return "\n".join([
        "| | baseline (uvicorn) | Ray Serve | ratio |",
        "|---|---|---|---|",
        f"| p50, sequential 1-row | {r['baseline_p50_ms']} ms | {r['serve_p50_ms']} ms | {r['p50_ratio']} |",
        f"| p99, sequential 1-row | {r['baseline_p99_ms']} ms | {r['serve_p99_ms']} ms | {r['p99_ratio']} |",
        f"| predictions/s, {r['concurrency']} conns x {r['rows_per_request']} rows | "
        f"{r['baseline_predictions_per_s']} | {r['batched_predictions_per_s']} | |",
        f"| p50 / p99, every one of {len(r['tenants'])} tenants in turn (Serve) | | "
        f"{r['serve_all_tenants_p50_ms']} / {r['serve_all_tenants_p99_ms']} ms | p99 {r['serve_p99_ratio']} |",
        f"student loads per replica {r['model_loads_per_replica']}, most models held by one replica "
        f"{r['max_models_per_replica']}",
        *([f"LoopFM lookup (Serve, 1 row): p50 {r['lookup_off_p50_ms']} -> {r['lookup_on_p50_ms']} ms "
           f"(ratio {r['lookup_p50_ratio']}), p99 {r['lookup_off_p99_ms']} -> {r['lookup_on_p99_ms']} ms "
           f"(ratio {r['lookup_p99_ratio']})"] if "lookup_p50_ratio" in r else []),
    ])  # fmt: skip
