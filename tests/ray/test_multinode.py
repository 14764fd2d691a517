"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a raylet per node),
its node types declared by the custom resources of cluster.yaml. The whole loop is submitted
through the Jobs API, as `ray job submit` does, and every actor that asked for a node type's
resource is found on a node of that type (issue 17)."""

import sys
import time
from pathlib import Path

import pytest
import yaml

from exfm_ray.serving.deploy import free_port

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
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                      "dashboard_port": port})  # fmt: skip
    try:
        for resource, node in NODE_TYPES.items():
            c.add_node(num_cpus=node["num_cpus"], resources={resource: node["amount"]})
        c.wait_for_nodes()
        yield c, f"http://127.0.0.1:{port}"
    finally:
        c.shutdown()


def test_the_pipeline_submitted_through_the_jobs_api_puts_each_part_on_its_node_type(cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    _, dashboard = cluster
    config = {
        "source": {"synthetic": {"num_windows": 3, "rows_per_window": 4000, "num_tenants": 2}},
        "fm": {"size": 1, "batch_size": 128},
        "fm_resources": {"fm_shard": 1},
        "tenants": [{"name": n, "rows": [n], "resources_per_worker": {"student_pool": 1}} for n in ("feed", "stories")],
        "das_resources": {"student_pool": 0.1},
        "serve": {"port": free_port(), "app_name": "students_multinode", "replica_cpus": 0.5,
                  "replica_resources": {"serve_pool": 0.5}, "reload_interval_s": 0.5},
        "latency_requests": 10,
        "sample_rows": 8,
    }  # fmt: skip
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    client = JobSubmissionClient(dashboard)
    deadline = time.monotonic() + 600
    while True:  # the head's job agent answers a few seconds after the cluster is up
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} -m jobs.pipeline --config {tmp_path / 'pipeline.yaml'} "
                f"--storage {tmp_path / 'store'}",
                runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
            )
            break
        except RuntimeError as exc:
            assert "No available agent" in str(exc) and time.monotonic() < deadline - 540, exc
            time.sleep(2)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    serving = logs.split("## Serving", 1)[-1]
    assert "| feed | g1-w0002 |" in serving and "| stories | g1-w0002 |" in serving, logs[-3000:]  # served, checked

    address = dashboard  # the state API of that cluster (an http address is its dashboard, not a GCS)
    node_type = {}
    for node in list_nodes(address=address, detail=True):
        kinds = [r for r in NODE_TYPES if r in node.resources_total]
        node_type[node.node_id] = kinds[0] if kinds else "head"
    placed = {}  # (class, resource it asked for) -> node types it ran on
    for actor in list_actors(address=address, detail=True, limit=10_000):
        # In a placement group the resource is renamed <name>_group_<pg id>: match the prefix.
        asked = [r for r in NODE_TYPES if any(k.startswith(r) for k in actor.required_resources or {})]
        for resource in asked:
            placed.setdefault((actor.class_name, resource), set()).add(node_type[actor.node_id])
    for (cls, resource), types in placed.items():
        assert types == {resource}, f"{cls} asked for {resource} and ran on {types}"
    classes = {resource: {cls for cls, r in placed if r == resource} for resource in NODE_TYPES}
    assert "FMShard" in classes["fm_shard"] and "RayTrainWorker" in classes["fm_shard"], placed  # group + training
    assert "RayTrainWorker" in classes["student_pool"], placed  # tenant runs
    assert any("FMLabeler" in cls for cls in classes["student_pool"]), placed  # the DAS's labelers
    assert any(cls.startswith("ServeReplica") for cls in classes["serve_pool"]), placed
