"""Tenant students on a local CPU Ray: concurrent Ray Train runs that follow the DAS's windows,
a tenant added and one removed while they run, and a killed worker that resumes."""

import os
import shutil
import signal
import time

import numpy as np
import pytest
import ray
import torch

from actors.launch import fit_tenant_task, start_tenant_manager
from actors.tenant_manager import TenantManagerConfig
from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.config import FMConfig
from exfm_ray.students.store import StudentStore
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.registry import TenantRegistry
from exfm_ray.tenants.run import TenantRun
from exfm_ray.tenants.trainer import TenantRunConfig
from jobs.cli import main

pytestmark = pytest.mark.ray
WINDOWS = 6


@pytest.fixture(scope="module")
def source(ray_cluster, tmp_path_factory):
    """Every window augmented once (FM trained through t-1 labels t), to be committed on cue."""
    root = tmp_path_factory.mktemp("augmented")
    stream = SyntheticStream(SyntheticConfig(num_windows=WINDOWS, rows_per_window=10_000, num_tenants=3)).stream()
    augment_stream_locally(stream, root, FMConfig(size=3))
    return AugmentedStore(root)


def commit(source: AugmentedStore, storage, t: int) -> None:
    """What the DAS does when it finishes window t, from already augmented rows."""
    store = AugmentedStore(storage)
    staged = store.staging_dir(f"copy{t}") / f"window={t}"
    shutil.copytree(source.window_dir(t), staged)
    store.commit(t, staged, source.records()[t], source.spec())


def wait_until(predicate, timeout_s=120.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def history(storage, name):
    reg = TenantRegistry(storage)
    return reg.read_json(reg.metrics_path(name)) or []


def test_tenants_train_concurrently_follow_the_stream_and_take_new_tenants(source, tmp_path, ray_cluster):
    storage = tmp_path
    for t in range(4):  # the DAS has finished windows 0..3 so far
        commit(source, storage, t)
    reg = TenantRegistry(storage)
    reg.add(TenantConfig(name="feed", control=True))
    reg.add(TenantConfig(name="stories", control=True, workers=2))  # data parallel over 2 workers
    reg.add(TenantConfig(name="feed_tmp", rows=["feed"], student={"batch_size": 32}))
    manager = start_tenant_manager(TenantManagerConfig(storage=str(storage), max_concurrent=4, poll_s=0.3))
    try:
        done = manager.train.remote(0, WINDOWS - 1, True)
        wait_until(lambda: len(history(storage, "feed")) >= 1, what="feed's first window")
        search = tmp_path / "search.yaml"
        search.write_text("control: true\nstudent: {size: 1}\n")
        cli = ["--storage", str(storage), "--address", ray_cluster]
        # A new tenant joins the running system through the CLI, which finds the running manager.
        assert main(["tenants", "add", "search", "--config", str(search), *cli]) == 0
        wait_until(lambda: len(history(storage, "feed_tmp")) >= 1, what="feed_tmp's first window")
        assert main(["tenants", "remove", "feed_tmp", *cli]) == 0
        wait_until(lambda: ray.get(manager.status.remote())["runs"]["feed_tmp"]["status"] != "running", what="stop")
        for t in range(4, WINDOWS):  # later windows arrive while the runs wait for them
            commit(source, storage, t)
        status = ray.get(done, timeout=600)
    finally:
        ray.kill(manager)
    runs = status["runs"]
    assert {n: r["status"] for n, r in runs.items()} == dict.fromkeys(
        ["feed", "stories", "feed_tmp", "search"], "finished"
    )
    # concurrent: each of the first two started before the other finished
    assert (
        runs["feed"]["started_at"] < runs["stories"]["ended_at"]
        and runs["stories"]["started_at"] < runs["feed"]["ended_at"]
    )
    store = StudentStore(storage)
    ne_exfm, ne_alone = [], []
    for name in ("feed", "stories", "search"):
        h = history(storage, name)
        assert [r["window"] for r in h] == list(range(WINDOWS)), name  # every window once, in order
        assert np.mean([r["ne"] for r in h[-2:]]) < h[0]["ne"], name
        ne_exfm += [r["ne"] for r in h[2:]]
        ne_alone += [r["control_ne"] for r in h[2:]]
        meta = store.latest_meta(name)
        assert meta.version == f"g1-w{WINDOWS - 1:04d}" and meta.window == WINDOWS - 1
        assert meta.fm_versions and meta.metrics["ne"] == pytest.approx(h[-1]["ne"])
    assert np.mean(ne_exfm) < np.mean(ne_alone)  # the FM's columns help the same student
    stopped = history(storage, "feed_tmp")
    assert 1 <= len(stopped) < WINDOWS and store.latest("feed_tmp") is None


def test_a_killed_worker_resumes_from_its_checkpoint_and_reports_each_window_once(source, tmp_path):
    storage = tmp_path
    for t in range(4):
        commit(source, storage, t)
    cfg = TenantConfig(name="feed_ft", rows=["feed"], student={"batch_size": 8})  # slow windows: time to kill
    entry = TenantRegistry(storage).add(cfg)
    ref = fit_tenant_task().remote(TenantRunConfig(storage=str(storage), entry=entry, last_window=3))
    reg = TenantRegistry(storage)

    def mid_window_2():
        p = reg.read_json(reg.progress_path("feed_ft")) or {}
        return p if p.get("window") == 2 and p.get("phase") == "train" and p.get("batch", 0) > 20 else None

    killed = wait_until(mid_window_2, what="window 2 in training")["pid"]
    os.kill(killed, signal.SIGKILL)
    result = ray.get(ref, timeout=600)
    assert result["windows"] == [0, 1, 2, 3] and result["last_window"] == 3
    assert reg.read_json(reg.progress_path("feed_ft"))["pid"] != killed  # a new worker finished it
    h = history(storage, "feed_ft")
    assert [r["window"] for r in h] == [0, 1, 2, 3]
    # The resumed run is the uninterrupted one: same metrics as the plain in-process loop.
    torch.set_num_threads(1)
    view = resolve(cfg, AugmentedStore(storage).spec())
    plain = TenantRun(view)
    for t in range(4):
        ref_rec = plain.window(t, AugmentedStore(storage).read_window(t, columns=view.columns))
        np.testing.assert_allclose([h[t]["ne"], h[t]["loss"]], [ref_rec["ne"], ref_rec["loss"]], rtol=1e-4)
