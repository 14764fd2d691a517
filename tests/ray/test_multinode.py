"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a raylet per node),
its node types declared by the custom resources of cluster.yaml. The whole loop (`exfm run`: FM
training job -> FM group -> DAS -> tenant runs -> Ray Serve over HTTP -> report) is submitted
through the Jobs API, as `ray job submit` does, and loses a worker node while it runs; then every
actor that asked for a node type's resource is found on a node of that type (issue 17). The same
run is checked end to end: every row augmented once per example, the served students, the LoopFM
store, the report; a second job continues it and redoes nothing."""

import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from exfm_ray.serving.deploy import free_port
from tests.multinode_helpers import (
    NODE_TYPES,
    REPO,
    TENANTS,
    assert_each_part_on_its_node_type,
    node_types,
    pipeline_config,
    report_json,
    submit,
    wait,
)
from tests.ray_env import TEST_CLUSTER_ENV

pytestmark = pytest.mark.ray
WINDOWS = 6


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


@pytest.fixture(scope="module")
def killed_run(cluster, tmp_path_factory):
    """The whole loop submitted through the Jobs API, each part pinned to its node type. A second
    student_pool node joins; once the tenant runs are training and Serve answers, the node holding a
    tenant's Ray Train worker is killed (no graceful drain) while a client keeps asking Serve."""
    import asyncio
    import threading

    from ray.util.state import list_actors

    from exfm_ray.bench.http_load import concurrent, post_until
    from exfm_ray.students.store import StudentStore
    from exfm_ray.tenants.registry import TenantRegistry
    from tests.serving_helpers import rows_for

    c, dashboard, serve_port = cluster
    c.add_node(num_cpus=NODE_TYPES["student_pool"]["num_cpus"], resources={"student_pool": 3},
               dashboard_agent_listen_port=free_port())  # fmt: skip
    c.wait_for_nodes()
    folder = tmp_path_factory.mktemp("jobs_api")
    config, storage = pipeline_config(WINDOWS, serve_port), folder / "store"
    client, job = submit(dashboard, config, folder)
    registry = TenantRegistry(storage)
    deadline = time.monotonic() + 400
    while not all(registry.history(n) for n in TENANTS):
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
    node_type = node_types(dashboard)  # read while the node to be killed lives
    trained = {n: len(registry.history(n)) for n in TENANTS}
    assert min(trained.values()) < WINDOWS, "trained every window before the kill: the test would prove nothing"
    loader.start()
    time.sleep(3)
    killed_at = time.monotonic()
    c.remove_node(victims[0], allow_graceful=False)
    while not all(len(registry.history(n)) > trained[n] for n in trained):  # training goes on without it
        assert time.monotonic() < killed_at + 300, client.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    resumed = time.monotonic() - killed_at
    loader.join()
    logs = wait(client, job)
    print(f"node killed with {trained} windows trained; every tenant trained its next one {resumed:.1f} s later; "
          f"Serve during the kill: {load['got'].ok} of {load['got'].total} requests answered 200")  # fmt: skip
    report = json.loads(report_json(logs).read_text())
    return {"config": config, "folder": folder, "storage": storage, "logs": logs, "report": report,
            "load": load["got"], "supervisors": where, "head": c.head_node.node_id,
            "node_type": node_type, "dashboard": dashboard}  # fmt: skip


def test_the_pipeline_through_the_jobs_api_places_each_part_and_survives_a_worker_node_kill(killed_run):
    """Ray Train restarts the killed run's workers on the node left, the tenants resume from their state
    files, the DAS's workers are rebuilt, Serve answers >= 99% of the requests sent during the kill, and
    the job ends with every window committed whole and trained once by every tenant. Then every actor
    that asked for a node type's resource is found to have run on a node of that type (the state API)."""
    from exfm_ray.das.store import AugmentedStore
    from exfm_ray.tenants.registry import TenantRegistry

    run = killed_run
    assert set(run["supervisors"].values()) == {run["head"]}, run["supervisors"]
    got = run["load"]
    assert got.total > 100 and got.success_rate >= 0.99, (dict(got.statuses), dict(got.failures))
    serving = run["logs"].split("## Serving", 1)[-1]
    for tenant in TENANTS:  # served, and checked against the in-process student
        assert f"| {tenant} | g1-w{WINDOWS - 1:04d} |" in serving, run["logs"][-3000:]
    records = AugmentedStore(run["storage"]).records()
    assert sorted(records) == list(range(WINDOWS))
    assert all(r.output_rows == r.input_rows for r in records.values())
    for tenant in TENANTS:
        assert [r["window"] for r in TenantRegistry(run["storage"]).history(tenant)] == list(range(WINDOWS)), tenant
    assert_each_part_on_its_node_type(run["dashboard"], run["node_type"])


def test_every_row_is_augmented_once_per_example_and_every_window_trained(killed_run):
    from exfm_ray.das.store import AugmentedStore
    from exfm_ray.data.stream import window_dir
    from exfm_ray.fm.registry import FMRegistry

    storage, report = killed_run["storage"], killed_run["report"]
    records = AugmentedStore(storage).records()
    for t, rec in records.items():
        ids = pq.read_table(window_dir(f"{storage}/stream", t), columns=["example_id"]).column("example_id")
        assert rec.input_rows == rec.output_rows == len(ids)
        unique = len(set(ids.to_pylist()))
        assert rec.fm_calls == (0 if t < report["fm_delay"] else unique) and unique < len(ids)  # once per example
    assert records[0].masked_rows == records[0].input_rows  # no FM before the first window
    assert all(records[t].fm_calls > 0 and records[t].masked_rows == 0 for t in range(1, WINDOWS))
    versions = FMRegistry(storage).versions()
    assert [v.through_window for v in versions] == list(range(WINDOWS - 1))  # one per window, streaming
    for tenant, h in report["windows"].items():
        assert [r["window"] for r in h] == list(range(WINDOWS)), tenant


def test_served_students_answer_like_the_in_process_students(killed_run):
    from exfm_ray.students.store import StudentStore

    served, store = killed_run["report"]["serving"]["tenants"], StudentStore(killed_run["storage"])
    assert sorted(served) == sorted(TENANTS)
    for tenant, s in served.items():
        assert s["version"] == store.latest(tenant).version == f"g1-w{WINDOWS - 1:04d}"
        assert s["rows"] == killed_run["config"]["sample_rows"] and s["max_abs_diff"] < 1e-5
        assert 0 < s["p50_ms"] <= s["p99_ms"]
    # the LoopFM tenant is answered from the newest store version (the parity above used it too)
    assert served["stories"]["store_version"] == WINDOWS - 1 and served["feed"]["store_version"] is None


def test_the_loopfm_store_has_one_version_per_window_read_one_window_late(killed_run):
    from exfm_ray.loopfm.builder import store_root
    from exfm_ray.loopfm.store import StoreReader

    report = killed_run["report"]
    manifest = StoreReader.open(store_root(killed_run["storage"])).manifest()
    assert sorted(int(t) for t in manifest) == list(range(WINDOWS))
    assert manifest["0"].entities == {"user_id": 0} and manifest[str(WINDOWS - 1)].entities["user_id"] > 0
    assert sum("LoopFM store version" in line for line in killed_run["logs"].splitlines()) == WINDOWS
    # each window of the LoopFM tenant read the version before it, never its own
    assert [r.get("store_version") for r in report["windows"]["stories"]] == [None, *range(WINDOWS - 1)]
    assert all("store_version" not in r for r in report["windows"]["feed"])


def test_report_shows_the_fm_helping_the_students(killed_run):
    from exfm_ray.students.guard import NE_KEY

    report = killed_run["report"]
    overall = report["all_tenants"]
    assert overall["ne_mean"] < overall["control_ne_mean"]  # ExFM column below the student-alone column
    # the guard's served model, beside the ExFM student and the control, per tenant and overall
    for name, s in [*report["tenants"].items(), ("all", overall)]:
        assert 0 < s["served_ne_mean"] < 2 and "transfer_ratio" in s, name
        assert sum(s["served"].values()) > 0 and set(s["served"]) <= set(NE_KEY), name
    for h in report["windows"].values():
        for r in h:  # each window scores what the guard had published after the window before
            assert r["served_ne"] == r[NE_KEY[r["served"]]] and r["guard_reason"], r
    text = report_json(killed_run["logs"]).with_name("report.md").read_text()
    assert "| all tenants |" in text and "FM calls" in text
    # the young FM judged once per tenant on the posts of every tenant (all in one run here)
    assert all(s["young_fm"]["pooled"] == sorted(report["tenants"]) for s in report["tenants"].values())
    assert "Young FM's benefit of the doubt" in text and f"{len(report['tenants'])} tenants)" in text
    system = {r["window"]: r for r in report["system"]}
    assert system[0]["staleness_h"] is None and 0 < system[WINDOWS - 1]["staleness_h"] < 24
    assert all(r["fm_calls_per_row"] < 1 for t, r in system.items() if t >= report["fm_delay"])  # shared examples


def test_a_second_job_continues_the_run_and_redoes_nothing(killed_run):
    """The same job submitted again: every window is already augmented, every tenant through the last
    window (no Ray Train run started for nothing), no FM or LoopFM store version written again."""
    from exfm_ray.fm.registry import FMRegistry
    from exfm_ray.loopfm.builder import store_root

    storage, report = killed_run["storage"], killed_run["report"]
    versions = [v.version for v in FMRegistry(storage).versions()]
    loop_manifest = (store_root(storage) / "manifest.json").read_text()
    logs = wait(*submit(killed_run["dashboard"], killed_run["config"], killed_run["folder"]))
    lines = logs.splitlines()
    assert (store_root(storage) / "manifest.json").read_text() == loop_manifest  # no version rewritten
    assert not any("LoopFM store version" in line for line in lines)
    assert sum("already augmented" in line for line in lines) == WINDOWS
    assert sorted(line for line in lines if line.startswith("tenant ")) == [
        f"tenant {n}: finished, 0 run start(s)" for n in sorted(TENANTS)
    ]
    assert [v.version for v in FMRegistry(storage).versions()] == versions
    again = json.loads(report_json(logs).read_text())
    assert {n: len(h) for n, h in again["windows"].items()} == {n: len(h) for n, h in report["windows"].items()}
    assert again["all_tenants"]["ne_mean"] == pytest.approx(report["all_tenants"]["ne_mean"])


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
