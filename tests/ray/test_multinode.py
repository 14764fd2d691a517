"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a raylet per node),
its node types declared by the custom resources of cluster.yaml. The whole loop is submitted
through the Jobs API, as `ray job submit` does, and every actor that asked for a node type's
resource is found on a node of that type (issue 17)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from exfm_ray.serving.deploy import free_port
from tests.ray_env import TEST_CLUSTER_ENV

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
# Node types as in cluster.yaml: the FM (training job + group), tenant trainers and the DAS, Serve.
NODE_TYPES = {"fm_shard": {"num_cpus": 4, "amount": 4}, "student_pool": {"num_cpus": 3, "amount": 3},
              "serve_pool": {"num_cpus": 1, "amount": 1}}  # fmt: skip


def test_the_test_cluster_declares_the_node_types_of_cluster_yaml():
    types = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    custom = {r for t in types.values() for r in t.get("resources", {}) if r not in ("CPU", "GPU")}
    assert custom == set(NODE_TYPES)


@pytest.fixture(scope="module")
def cluster():
    """Head (drivers, supervisors) + one node per type; apart from the tier's shared local Ray."""
    from ray.cluster_utils import Cluster

    port = free_port()
    # A killed raylet is declared dead after 3 missed health checks 1 s apart (Ray's default: 5 at 3 s,
    # ~15 s the tests would wait out); Ray Train as in the tier's shared Ray (tests/ray_env.py).
    env = pytest.MonkeyPatch()
    for key, value in TEST_CLUSTER_ENV.items():
        env.setenv(key, value)
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    # Ports of its own: the tier's shared Ray already holds the defaults (its job agent's 52365).
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": port,
                                                      "dashboard_agent_listen_port": free_port(),
                                                      "_system_config": health})  # fmt: skip
    try:
        for resource, node in NODE_TYPES.items():
            c.add_node(num_cpus=node["num_cpus"], resources={resource: node["amount"]},
                       dashboard_agent_listen_port=free_port())  # fmt: skip
        c.wait_for_nodes()
        yield c, f"http://127.0.0.1:{port}", free_port()  # Serve's HTTP port: one per cluster, kept by Serve
    finally:
        c.shutdown()
        env.undo()


def _config(windows: int, serve_port: int) -> dict:
    """The whole loop, each part pinned to its node type by the custom resources of cluster.yaml. On a
    cluster the students stay served after a job: the next job's app replaces this one (same name)."""
    return {
        "source": {"synthetic": {"num_windows": windows, "rows_per_window": 4000, "num_tenants": 2}},
        "fm": {"size": 1, "batch_size": 128},
        "fm_resources": {"fm_shard": 1},
        "tenants": [{"name": n, "rows": [n], "resources_per_worker": {"student_pool": 1}} for n in ("feed", "stories")],
        "das_resources": {"student_pool": 0.1},
        "serve": {"port": serve_port, "app_name": "students_multinode", "replica_cpus": 0.5,
                  "replica_resources": {"serve_pool": 0.5}, "reload_interval_s": 0.5},
        "latency_requests": 10,
        "sample_rows": 8,
        # One FM rank and one tenant run: placement and the node kill are what is asserted here; each
        # more run or rank is a process importing torch on this 2-core machine.
        "fm_workers": 1,
        "fm_shards": 1,
        "max_concurrent_tenants": 1,
    }  # fmt: skip


def _submit(dashboard: str, config: dict, folder: Path):
    """`ray job submit -- python -m jobs.pipeline --config ... --storage ...` through the Jobs API."""
    from ray.job_submission import JobSubmissionClient

    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    client = JobSubmissionClient(dashboard)
    deadline = time.monotonic() + 60
    while True:  # the head's job agent answers a few seconds after the cluster is up
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} -m jobs.pipeline --config {folder / 'pipeline.yaml'} "
                f"--storage {folder / 'store'}",
                runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
            )
            return client, job
        except RuntimeError as exc:
            assert "No available agent" in str(exc) and time.monotonic() < deadline, exc
            time.sleep(2)


def _wait(client, job, timeout_s: float = 600) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def _served(logs: str, last: int) -> None:
    serving = logs.split("## Serving", 1)[-1]
    for tenant in ("feed", "stories"):  # served, and checked against the in-process student
        assert f"| {tenant} | g1-w{last:04d} |" in serving, logs[-3000:]


def _node_types(address: str) -> dict[str, str]:
    """Node id -> its node type (the custom resource it declares), from that cluster's state API."""
    from ray.util.state import list_nodes

    types = {}
    for node in list_nodes(address=address, detail=True):
        kinds = [r for r in NODE_TYPES if r in node.resources_total]
        types[node.node_id] = kinds[0] if kinds else "head"
    return types


def _assert_each_part_on_its_node_type(address: str, node_type: dict[str, str]) -> None:
    """Every actor that asked for a node type's resource ran on a node of that type (the killed one
    included: `node_type` was read while it lived)."""
    from ray.util.state import list_actors

    placed = {}  # (class, resource it asked for) -> node types it ran on
    for actor in list_actors(address=address, detail=True, limit=10_000):
        # In a placement group the resource is renamed <name>_group_<pg id>: match the prefix.
        asked = [r for r in NODE_TYPES if any(k.startswith(r) for k in actor.required_resources or {})]
        for resource in asked:
            placed.setdefault((actor.class_name, resource), set()).add(node_type.get(actor.node_id, "unknown"))
    for (cls, resource), types in placed.items():
        assert types == {resource}, f"{cls} asked for {resource} and ran on {types}"
    classes = {resource: {cls for cls, r in placed if r == resource} for resource in NODE_TYPES}
    assert "FMShard" in classes["fm_shard"] and "RayTrainWorker" in classes["fm_shard"], placed  # group + training
    assert "RayTrainWorker" in classes["student_pool"], placed  # tenant runs
    assert any("DASWorker" in cls for cls in classes["student_pool"]), placed  # the DAS workers
    assert any(cls.startswith("ServeReplica") for cls in classes["serve_pool"]), placed


def test_the_pipeline_through_the_jobs_api_places_each_part_and_survives_a_worker_node_kill(cluster, tmp_path):
    """The whole loop submitted through the Jobs API (as `ray job submit` does), each part pinned to
    its node type. A second student_pool node joins; once the tenant runs are training and Serve
    answers, the node holding a tenant's Ray Train worker is killed (no graceful drain) while a
    client keeps asking Serve. Ray Train restarts the run's workers on the node left, the tenants resume from
    their state files, the DAS's workers are rebuilt, Serve answers >= 99% of the requests sent
    during the kill, and the job ends with every window committed whole and trained once by every
    tenant. Then every actor that asked for a node type's resource is found to have run on a node
    of that type (the state API), the killed node included."""
    import asyncio
    import threading

    from ray.util.state import list_actors

    from exfm_ray.bench.http_load import concurrent, post_until
    from exfm_ray.das.store import AugmentedStore
    from exfm_ray.students.store import StudentStore
    from exfm_ray.tenants.registry import TenantRegistry
    from tests.serving_helpers import rows_for

    c, dashboard, serve_port = cluster
    c.add_node(num_cpus=NODE_TYPES["student_pool"]["num_cpus"], resources={"student_pool": 3},
               dashboard_agent_listen_port=free_port())  # fmt: skip
    c.wait_for_nodes()
    windows, storage = 6, tmp_path / "store"
    client, job = _submit(dashboard, _config(windows, serve_port), tmp_path)
    registry = TenantRegistry(storage)
    deadline = time.monotonic() + 400
    while not all(registry.history(n) for n in ("feed", "stories")):
        status = client.get_job_status(job)
        assert time.monotonic() < deadline and status in ("PENDING", "RUNNING"), client.get_job_logs(job)[-3000:]
        time.sleep(1)
    url = f"http://127.0.0.1:{serve_port}/v1/tenants/feed/predict"
    bodies = [{"rows": rows_for(StudentStore(storage), "feed", 2, seed=s)} for s in range(8)]
    post_until(url, bodies[0], timeout_s=180)  # the job serves the students once each has one
    load = {}
    loader = threading.Thread(target=lambda: load.update(got=asyncio.run(concurrent(url, bodies, 2, 2, 15.0))))
    alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
    trainers = {a.node_id for a in alive if a.class_name == "RayTrainWorker"
                and any(k.startswith("student_pool") for k in a.required_resources or {})}  # fmt: skip
    victims = [n for n in c.worker_nodes if n.node_id in trainers]
    assert victims, [(a.class_name, a.node_id, a.required_resources) for a in alive]
    # The supervisors run beside the job's driver, on the head: not lost with a worker node (they were).
    where = {a.class_name: a.node_id for a in alive if a.class_name in ("JobSupervisor", "TenantManager", "FMGroup")}
    assert set(where.values()) == {c.head_node.node_id}, where
    node_type = _node_types(dashboard)  # read while the node to be killed lives
    trained = {n: len(registry.history(n)) for n in ("feed", "stories")}
    assert min(trained.values()) < windows, "trained every window before the kill: the test would prove nothing"
    loader.start()
    time.sleep(3)
    killed_at = time.monotonic()
    c.remove_node(victims[0], allow_graceful=False)
    while not all(len(registry.history(n)) > trained[n] for n in trained):  # training goes on without it
        assert time.monotonic() < killed_at + 300, client.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    resumed = time.monotonic() - killed_at
    loader.join()
    got = load["got"]
    print(f"node killed with {trained} windows trained; every tenant trained its next one {resumed:.1f} s later; "
          f"Serve during the kill: {got.ok} of {got.total} requests answered 200")  # fmt: skip
    assert got.total > 100 and got.success_rate >= 0.99, (dict(got.statuses), dict(got.failures))
    _served(_wait(client, job), windows - 1)
    records = AugmentedStore(storage).records()
    assert sorted(records) == list(range(windows))
    assert all(r.output_rows == r.input_rows for r in records.values())
    for tenant in ("feed", "stories"):
        assert [r["window"] for r in registry.history(tenant)] == list(range(windows)), tenant
    _assert_each_part_on_its_node_type(dashboard, node_type)


def test_the_fm_node_killed_the_group_rebuilds_when_a_node_joins_and_the_das_waits(cluster, tmp_path):
    """The node holding the FM group's ranks is killed without drain; the DAS, started right after,
    finds the FM gone and waits (max_wait_s); a new FM node joins and the group rebuilds its gang
    there; the window commits whole with every row labeled. (A resource of its own, `fm_node`, keeps
    this test's FM apart from the module's `fm_shard` node.)"""
    import numpy as np
    import torch

    from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
    from exfm_ray.fm.model import FMConfig, build_fm
    from exfm_ray.fm.registry import FMRegistry, publish_model

    c = cluster[0]
    stream = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=3000, num_tenants=2)).stream()
    stream.write(tmp_path / "stream", row_group_rows=500)
    torch.manual_seed(0)
    fm = build_fm(stream.spec, FMConfig(size=1)).eval()
    watermark = stream.spec.window_starts[1] - 1
    publish_model(FMRegistry(tmp_path), fm, stream.spec, FMConfig(size=1), watermark=watermark, through_window=0)

    def fm_node():
        node = c.add_node(num_cpus=2, resources={"fm_node": 2}, dashboard_agent_listen_port=free_port())
        c.wait_for_nodes()
        return node

    first = fm_node()
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fm_node_driver.py"), str(tmp_path), c.address, "300"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    ready = driver.stdout.readline()
    assert ready.startswith("READY"), ready
    assert json.loads(ready.split(" ", 1)[1]) == [first.node_id] * 2  # both ranks on the FM node
    c.remove_node(first, allow_graceful=False)
    (tmp_path / "GO").write_text("")
    time.sleep(5)  # the DAS starts meanwhile, finds the gang dead and waits
    second = fm_node()
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out[-3000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT")).split(" ", 1)[1])
    rec = result["record"]
    assert result["status"] == "committed" and rec["output_rows"] == rec["input_rows"] == stream.windows[1].num_rows
    assert rec["masked_rows"] == rec["unlabeled_rows"] == 0  # waited for the FM, labeled every row
    assert rec["fm_calls"] == len(np.unique(stream.windows[1].column("example_id").to_numpy()))
    assert result["rebuilds"] >= 1 and result["gang"] == "ready"
    assert result["rank_nodes"] == [second.node_id] * 2  # rebuilt on the node that joined
