"""The student service end to end: real Ray, real Serve (HAProxy ingress), real HTTP."""

import asyncio
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from exfm_ray.bench.http_load import concurrent
from exfm_ray.serving.config import ServeConfig
from exfm_ray.serving.demo import publish_synthetic_students, synthetic_spec_and_stream, train_student
from exfm_ray.serving.deploy import free_port
from exfm_ray.students.config import StudentConfig
from exfm_ray.students.meta import student_meta
from exfm_ray.students.store import StudentStore
from tests.serving_helpers import expected_probabilities, published_model, rows_for

pytestmark = pytest.mark.ray

RELOAD_S = 0.5
MAX_MODELS = 2  # of 3 tenants: every replica must evict
SERVING_CLASSES = {"ServingStudent", "EmbeddingBagCollection", "ModuleDict", "EmbeddingBag", "Linear", "MLP",
                   "Perceptron", "Sequential", "ReLU"}  # fmt: skip


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    from exfm_ray.serving.deploy import deploy

    root = tmp_path_factory.mktemp("store")
    publish_synthetic_students(root, num_tenants=3)
    cfg = ServeConfig(
        store_root=root,
        port=free_port(),
        app_name="students_test",
        num_replicas=2,
        replica_cpus=0.5,
        reload_interval_s=RELOAD_S,
        max_models_per_replica=MAX_MODELS,
        max_rows_per_request=64,
        max_batch_rows=256,
    )
    url = deploy(cfg)
    with httpx.Client(base_url=url, timeout=30) as client:
        yield cfg, StudentStore(root), client
    serve.shutdown()  # the last module to serve: an idle Serve takes CPU from the tenant tests after it


def _predict(client, tenant, rows):
    return client.post(f"/v1/tenants/{tenant}/predict", json={"rows": rows})


def _inspect_every_replica(cfg, count=2):
    from ray import serve

    handle = serve.get_deployment_handle("StudentRouter", app_name=cfg.app_name)
    seen = {}
    for _ in range(60):
        info = handle.inspect_process.remote().result()
        seen[info["pid"]] = info
        if len(seen) == count:
            return list(seen.values())
    raise AssertionError(f"reached {len(seen)} of {count} replicas")


def test_two_tenants_answer_with_their_own_students(service):
    cfg, store, client = service
    answers = {}
    for tenant in store.tenants():
        model, meta = published_model(store, tenant)
        rows = rows_for(store, tenant, 5, seed=3)
        reply = _predict(client, tenant, rows)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["tenant"] == tenant and body["version"] == store.latest(tenant).version
        assert body["probabilities"] == pytest.approx(expected_probabilities(model, meta, rows), abs=1e-5)
        answers[tenant] = body["probabilities"]
    assert len(answers) == 3 and answers["feed"] != answers["stories"]
    listed = client.get("/v1/tenants").json()["tenants"]
    assert {t["tenant"]: t["version"] for t in listed} == {t: store.latest(t).version for t in store.tenants()}
    assert client.get("/v1/health").json()["status"] == "ok"
    assert "/v1/tenants/{tenant}/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def _bad_requests(store):
    good = rows_for(store, "feed", 2)
    feature = next(iter(good[0]["sparse"]))
    dense = next(iter(good[0]["dense"]))
    missing = {**good[1], "sparse": {k: v for k, v in good[1]["sparse"].items() if k != feature}}
    return [
        ("nobody", {"rows": good}, 404, None),
        ("feed", {"rows": [good[0], missing]}, 422, ["body", "rows", 1, "sparse", feature]),
        ("feed", {"rows": [good[0], {**good[1], "sparse": {**good[1]["sparse"], feature: ["7"]}}]}, 422,
         ["body", "rows", 1, "sparse", feature, 0]),
        ("feed", {"rows": [{**good[0], "sparse": {**good[0]["sparse"], feature: [10**9]}}]}, 422,
         ["body", "rows", 0, "sparse", feature]),
        ("feed", json.dumps({"rows": [{**good[0], "dense": {dense: math.nan}}]}), 422,  # json.dumps writes NaN
         ["body", "rows", 0, "dense", dense]),
        ("feed", {"rows": []}, 422, ["body", "rows"]),
        ("feed", {"rows": rows_for(store, "feed", 65)}, 422, ["body", "rows"]),
        ("feed", "{not json", 422, None),
    ]  # fmt: skip


def test_bad_input_gets_its_code_and_never_disturbs_good_requests(service):
    cfg, store, client = service
    pids = {i["pid"] for i in _inspect_every_replica(cfg)}

    def send(tenant, body):
        if isinstance(body, str):
            return client.post(
                f"/v1/tenants/{tenant}/predict", content=body, headers={"content-type": "application/json"}
            )
        return client.post(f"/v1/tenants/{tenant}/predict", json=body)

    for tenant, body, status, loc in _bad_requests(store):
        reply = send(tenant, body)
        assert reply.status_code == status, (body, reply.text)
        if loc is not None:
            assert reply.json()["detail"][0]["loc"] == loc, reply.text

    # Good and bad requests at once, so they share batches: every good one still gets its own answer.
    model, meta = published_model(store, "feed")
    good = [rows_for(store, "feed", 3, seed=s) for s in range(24)]
    bad = _bad_requests(store)
    with ThreadPoolExecutor(16) as pool:
        good_replies = [pool.submit(_predict, client, "feed", rows) for rows in good]
        bad_replies = [pool.submit(send, t, b) for t, b, _, _ in bad * 3]
        for rows, fut in zip(good, good_replies, strict=True):
            reply = fut.result()
            assert reply.status_code == 200
            assert reply.json()["probabilities"] == pytest.approx(expected_probabilities(model, meta, rows), abs=1e-5)
        assert [f.result().status_code for f in bad_replies] == [s for _, _, s, _ in bad * 3]
    assert {i["pid"] for i in _inspect_every_replica(cfg)} == pids  # no replica crashed or restarted


def test_concurrent_requests_are_batched(service):
    cfg, store, client = service
    before = sum(i["batches"] for i in _inspect_every_replica(cfg))
    bodies = [{"rows": rows_for(store, "stories", 2, seed=s)} for s in range(16)]
    load = asyncio.run(concurrent(f"{cfg.url}/v1/tenants/stories/predict", bodies, 2, concurrency=16, seconds=1.5))
    after = _inspect_every_replica(cfg)
    assert load.success_rate == 1.0 and load.ok > 50
    forward_passes = sum(i["batches"] for i in after) - before
    assert forward_passes < load.ok  # several requests shared forward passes


def test_serving_processes_hold_only_the_serving_path(service):
    cfg, store, client = service
    for _ in range(10):
        for tenant in store.tenants():
            assert _predict(client, tenant, rows_for(store, tenant, 1)).status_code == 200
    replicas = _inspect_every_replica(cfg)
    assert set().union(*(i["loaded"] for i in replicas)) == set(store.tenants())
    for info in replicas:
        for tenant, loaded in info["loaded"].items():
            model, _ = published_model(store, tenant)
            assert loaded["class"] == "ServingStudent"
            assert loaded["parameters"] == sorted(model.state_dict())
            assert not any("aux" in n or "adapter" in n for n in loaded["modules"] + loaded["parameters"])
        live = info["live_modules"]
        assert set(live) <= SERVING_CLASSES, live  # no Student, StudentAdapter, FoundationModel, aux head
        assert live["ServingStudent"] == len(info["loaded"])


def test_each_tenant_is_routed_to_one_replica(service):
    """HAProxy hashes the tenant's path: once the replica set is stable, a tenant's requests all go
    to one replica, so only that replica (re)loads its student. Spread over replicas instead, the LRU
    (2 models, 3 tenants) reloads each tenant on both. (Before the set is stable, e.g. while the
    second replica starts, a tenant may be loaded on another replica: only the deltas count.)"""
    cfg, store, client = service

    def ask_every_tenant(rounds: int) -> None:
        for _ in range(rounds):
            for tenant in store.tenants():
                assert _predict(client, tenant, rows_for(store, tenant, 1)).status_code == 200

    ask_every_tenant(3)
    before = {i["pid"]: i["loads"] for i in _inspect_every_replica(cfg)}
    ask_every_tenant(6)
    after = {i["pid"]: i["loads"] for i in _inspect_every_replica(cfg)}
    for tenant in store.tenants():
        grew = [pid for pid in after if after[pid].get(tenant, 0) > before.get(pid, {}).get(tenant, 0)]
        assert len(grew) <= 1, (tenant, before, after)


def test_each_replica_keeps_a_bounded_lru_of_tenant_models(service):
    cfg, store, client = service
    for _ in range(4):
        for tenant in store.tenants():
            assert _predict(client, tenant, rows_for(store, tenant, 1)).status_code == 200
    for info in _inspect_every_replica(cfg):
        assert 1 <= len(info["loaded"]) <= MAX_MODELS
        assert info["live_modules"]["ServingStudent"] == len(info["loaded"])  # evicted models are freed


def test_a_new_checkpoint_is_served_within_the_reload_delay(service):
    cfg, store, client = service
    old_model, old_meta = published_model(store, "feed")
    rows = rows_for(store, "feed", 4, seed=11)
    answers, stop = [], threading.Event()

    def keep_asking():
        with httpx.Client(base_url=cfg.url, timeout=30) as c:
            while not stop.is_set():
                reply = _predict(c, "feed", rows)
                answers.append((time.monotonic(), reply.status_code, reply.json()))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    time.sleep(1.0)
    spec, stream = synthetic_spec_and_stream(2)
    v2 = train_student(spec, stream, "feed", seed=42, steps=5)
    store.publish(v2, student_meta(spec, "feed", StudentConfig(), version="demo-2", window=1, variant="ah_sa"))
    published_at = time.monotonic()
    deadline = published_at + RELOAD_S + 3.0  # reload interval + loading + one in-flight request
    while time.monotonic() < deadline + 1.0:
        time.sleep(0.1)
    stop.set()
    asker.join()

    new_model, new_meta = published_model(store, "feed")
    expected = {
        "demo-1": expected_probabilities(old_model, old_meta, rows),
        "demo-2": expected_probabilities(new_model, new_meta, rows),
    }
    assert expected["demo-1"] != pytest.approx(expected["demo-2"], abs=1e-5)
    assert all(status == 200 for _, status, _ in answers), "a request failed during the switch"
    for _, _, body in answers:
        assert body["probabilities"] == pytest.approx(expected[body["version"]], abs=1e-5)
    assert any(body["version"] == "demo-1" for t, _, body in answers if t < published_at)
    late = [body["version"] for t, _, body in answers if t > deadline]
    assert late and set(late) == {"demo-2"}


def _running_replicas(cfg):
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][cfg.app_name]["deployments"]["StudentRouter"]["replicas"]
    return [r for r in replicas if r["state"] == "RUNNING"]


@pytest.mark.slow
def test_killing_a_replica_under_load_fails_almost_no_request(service):
    """Runs last in this module: it kills one of the two replicas, then waits for Serve to replace it.

    No client retry: the other replica and HAProxy's replay of requests the dead one dropped
    (RAY_SERVE_HAPROXY_RETRY_ON in jobs/cluster.py) must carry every request.
    """
    import ray

    cfg, store, client = service
    victim = _running_replicas(cfg)[0]
    bodies = [{"rows": rows_for(store, "feed", 2, seed=s)} for s in range(16)]
    result = {}

    def load():
        url = f"{cfg.url}/v1/tenants/feed/predict"
        result["load"] = asyncio.run(concurrent(url, bodies, 2, concurrency=8, seconds=6.0, retries=0))

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(2.0)
    served = {i["pid"]: i["batches"] for i in _inspect_every_replica(cfg)}
    assert served[victim["pid"]] > 0, "the victim took no traffic: the test would prove nothing"
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    loader.join()
    got = result["load"]
    assert got.total > 500
    assert got.success_rate >= 0.999, (dict(got.statuses), dict(got.failures))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Serve notices the dead replica and starts a new one
        running = {r["replica_id"] for r in _running_replicas(cfg)}
        if len(running) == 2 and victim["replica_id"] not in running:
            break
        time.sleep(0.5)
    assert len(running) == 2 and victim["replica_id"] not in running
