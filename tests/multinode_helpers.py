"""Shared by tests/ray/test_multinode.py: the node types of cluster.yaml, the whole loop's config
pinned to them, submitting it through the Jobs API, and where each actor ran (the state API)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Node types as in cluster.yaml: the FM (training job + group), tenant trainers and the DAS, Serve.
NODE_TYPES = {"fm_shard": {"num_cpus": 4, "amount": 4}, "student_pool": {"num_cpus": 3, "amount": 3},
              "serve_pool": {"num_cpus": 1, "amount": 1}}  # fmt: skip
TENANTS = ("feed", "stories")


def pipeline_config(windows: int, serve_port: int) -> dict:
    """The whole loop, each part pinned to its node type by the custom resources of cluster.yaml. On a
    cluster the students stay served after a job: the next job's app replaces this one (same name).
    `stories` reads LoopFM histories: the run folds each committed window into the store, and Serve
    answers it from the newest store version."""
    pool = {"student_pool": 1}
    return {
        "source": {"synthetic": {"num_windows": windows, "rows_per_window": 4000, "num_tenants": 2}},
        "fm": {"size": 1, "batch_size": 128},
        "fm_resources": {"fm_shard": 1},
        "tenants": [
            {"name": "feed", "rows": ["feed"], "control": True, "resources_per_worker": pool},
            {"name": "stories", "rows": ["stories"], "control": True, "variant": "kd_sa+loopfm",
             "resources_per_worker": pool},
        ],
        "das_resources": {"student_pool": 0.1},
        "serve": {"port": serve_port, "app_name": "students_multinode", "replica_cpus": 0.5,
                  "replica_resources": {"serve_pool": 0.5}, "reload_interval_s": 0.5},
        "latency_requests": 10,
        "sample_rows": 8,
        # One FM rank and one tenant run: what is asserted here does not need more, and each more run or
        # rank is a process importing torch on this 2-core machine (test_tenant_training, test_fm_jobs and
        # test_fm_group cover concurrent runs, 2-rank training and sharded groups).
        "fm_workers": 1,
        "fm_shards": 1,
        "max_concurrent_tenants": 1,
    }  # fmt: skip


def submit(dashboard: str, config: dict, folder: Path):
    """`ray job submit -- python -m jobs.pipeline --config ... --storage ...` through the Jobs API."""
    from ray.job_submission import JobSubmissionClient

    folder.mkdir(parents=True, exist_ok=True)
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


def wait(client, job, timeout_s: float = 600) -> str:
    """The job's logs once it succeeded (its tail in the failure otherwise)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def report_json(logs: str) -> Path:
    """The run's report.json, beside the report.md the job names in its last lines."""
    [line] = [line for line in logs.splitlines() if line.startswith("report: ")]
    return Path(line.split()[1]).with_name("report.json")


def node_types(address: str) -> dict[str, str]:
    """Node id -> its node type (the custom resource it declares), from that cluster's state API."""
    from ray.util.state import list_nodes

    types = {}
    for node in list_nodes(address=address, detail=True):
        kinds = [r for r in NODE_TYPES if r in node.resources_total]
        types[node.node_id] = kinds[0] if kinds else "head"
    return types


def assert_each_part_on_its_node_type(address: str, node_type: dict[str, str]) -> None:
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
