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

from actors.launch import start_tenant_manager
from actors.remote import fit_tenant_task
from actors.tenant_manager import TenantManagerConfig
from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.config import FMConfig
from exfm_ray.students.store import StudentStore
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.registry import TenantRegistry
from exfm_ray.tenants.run import TenantRun
from exfm_ray.tenants.trainer import TenantRunConfig, WindowPlan
from exfm_ray.tenants.young_board import posted
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
    return reg.history(name)


def test_tenants_train_concurrently_follow_the_stream_share_runs_and_take_new_tenants(source, tmp_path, ray_cluster):
    """Two runs: `stories` (data parallel) alone, and one run hosting every one-worker tenant,
    including `search` added while it trains and `broken` (its rows name no stream tenant), which
    fails alone: a group that stopped on it, or a manager that gave each tenant a run, fails here."""
    storage = tmp_path
    for t in range(4):  # the DAS has finished windows 0..3 so far
        commit(source, storage, t)
    reg = TenantRegistry(storage)
    reg.add(TenantConfig(name="feed", control=True))
    reg.add(TenantConfig(name="stories", control=True, workers=2))  # data parallel over 2 workers
    reg.add(TenantConfig(name="feed_tmp", rows=["feed"], student={"batch_size": 32}))
    reg.add(TenantConfig(name="broken", rows=["no_such_tenant"]))
    manager = start_tenant_manager(TenantManagerConfig(storage=str(storage), max_concurrent=2, poll_s=0.3))
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
        # (its run may first wait for stories' post at window 1: young_fm_wait_s, 120 s)
        stopped = lambda: ray.get(manager.status.remote())["runs"]["feed_tmp"]["status"] != "running"  # noqa: E731
        wait_until(stopped, timeout_s=300, what="stop")
        for t in range(4, WINDOWS):  # later windows arrive while the runs wait for them
            commit(source, storage, t)
        status = ray.get(done, timeout=600)
    finally:
        ray.kill(manager)
    runs = status["runs"]
    assert {n: r["status"] for n, r in runs.items()} == {
        **dict.fromkeys(["feed", "stories", "feed_tmp", "search"], "finished"),
        "broken": "failed",
    }
    assert "no_such_tenant" in runs["broken"]["error"] and history(storage, "broken") == []
    group = {n: r["group"] for n, r in runs.items()}
    assert group["stories"] == "solo-stories" and len({group[n] for n in ("feed", "feed_tmp", "search", "broken")}) == 1
    # concurrent: each of the two runs started before the other finished
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
    # the young FM judged once per tenant, on its first labeled window, on every tenant's evidence posted so far
    assert set(posted(TenantRegistry(storage))) == {"feed", "stories", "search"}  # feed_tmp removed: its post left out
    judged = {
        n: [r for r in history(storage, n) if "young_fm_on" in r] for n in ("feed", "stories", "feed_tmp", "search")
    }
    assert {n: [r["window"] for r in rs] for n, rs in judged.items()} == dict.fromkeys(judged, [1])
    # feed and feed_tmp share a run: both scored before either trained, each judged on the same posts. The two
    # runs train at the same time: whichever reaches window 1 first waits for the other's post (feed_tmp's counts
    # only while it is registered: the test removes it about then)
    feed, tmp, stories = judged["feed"][0], judged["feed_tmp"][0], judged["stories"][0]
    assert (feed["young_fm_z"], feed["young_fm_on"], feed["young_fm_pooled"]) == (
        tmp["young_fm_z"], tmp["young_fm_on"], tmp["young_fm_pooled"])  # fmt: skip
    assert {"feed", "stories"} <= set(feed["young_fm_pooled"]) & set(stories["young_fm_pooled"])
    assert all(len(rs[0]["young_fm_pooled"]) == rs[0]["young_fm_tenants"] for rs in judged.values())
    stopped = history(storage, "feed_tmp")
    assert 1 <= len(stopped) < WINDOWS and store.latest("feed_tmp") is None


def test_a_killed_worker_resumes_from_its_checkpoint_and_reports_each_window_once(source, tmp_path):
    storage = tmp_path
    for t in range(2):
        commit(source, storage, t)
    # slow windows (batch 8): time to kill; no guard twin: half the training (restoring a run with its twin
    # and guard: tests/unit/test_tenants.py). Two windows: the kill lands in the second, after the first's
    # state is on storage; the resumed worker trains it again from there.
    cfg = TenantConfig(name="feed_ft", rows=["feed"], guard=False, student={"batch_size": 8})
    entry = TenantRegistry(storage).add(cfg)
    ref = fit_tenant_task().remote(TenantRunConfig(storage=str(storage), lead=entry, plan=WindowPlan(last_window=1)))
    reg = TenantRegistry(storage)

    def mid_window_1():  # window 0's state is on storage: the new worker resumes from it
        p = reg.progress("feed_ft")
        return p if p.get("window") == 1 and p.get("phase") == "train" and p.get("batch", 0) > 20 else None

    killed = wait_until(mid_window_1, what="window 1 in training")["pid"]
    os.kill(killed, signal.SIGKILL)
    result = ray.get(ref, timeout=600)["tenants"]["feed_ft"]
    assert result["windows"] == [0, 1] and result["last_window"] == 1 and result["status"] == "finished"
    assert reg.read_json(reg.progress_path("feed_ft"))["pid"] != killed  # a new worker finished it
    h = history(storage, "feed_ft")
    assert [r["window"] for r in h] == [0, 1]
    # The resumed run is the uninterrupted one: same metrics as the plain in-process loop.
    torch.set_num_threads(1)
    view = resolve(cfg, AugmentedStore(storage).spec())
    plain = TenantRun(view)
    for t in range(2):
        ref_rec = plain.window(t, AugmentedStore(storage).read_window(t, columns=view.columns))
        np.testing.assert_allclose([h[t]["ne"], h[t]["loss"]], [ref_rec["ne"], ref_rec["loss"]], rtol=1e-4)


def test_on_too_few_slots_every_tenant_trains_every_window_and_a_failure_stays_its_own(source, tmp_path):
    """Three tenants, a run each, follow an unbounded stream with one slot. `broken` (its rows name no stream
    tenant: it registers, then fails when its run starts) goes first. A following run never ends by
    itself: before the manager asked runs to yield, the first healthy run held the slot forever and
    the other tenant never trained. A manager that stopped on the failure, kept its slot, or started
    it again would leave a healthy tenant behind or show `broken` as running."""
    storage = tmp_path
    healthy = ["feed", "stories"]
    for t in range(2):
        commit(source, storage, t)
    reg = TenantRegistry(storage)
    reg.add(TenantConfig(name="broken", rows=["no_such_tenant"], max_failures=0, own_run=True))  # first run
    for name in healthy:
        reg.add(TenantConfig(name=name, guard=False, student={"size": 1}, own_run=True))
    manager = start_tenant_manager(TenantManagerConfig(storage=str(storage), max_concurrent=1, poll_s=0.3))
    try:
        following = manager.train.remote(0, None, True)  # follows the stream with no end
        trained = lambda n: all(len(history(storage, name)) >= n for name in healthy)  # noqa: E731
        wait_until(lambda: trained(2), timeout_s=400, what="both healthy tenants through window 1")
        commit(source, storage, 2)  # a later window: both take it, one slot between them
        wait_until(lambda: trained(3), timeout_s=400, what="both healthy tenants through window 2")
        runs = ray.get(manager.status.remote())["runs"]
        assert not ray.wait([following], timeout=0)[0]  # still following (an error would end it)
        stopped = ray.get(manager.stop.remote())  # every run ends now: nothing left holding CPUs
        assert stopped["groups"] == {} and ray.get(following, timeout=30)["training"] is False
    finally:
        ray.kill(manager)
    assert runs["broken"]["status"] == "failed" and runs["broken"]["error"], runs
    assert runs["broken"]["starts"] == 1 and history(storage, "broken") == []  # not started again
    for name in healthy:
        assert [r["window"] for r in history(storage, name)] == [0, 1, 2], name  # every window, once
        assert StudentStore(storage).latest_meta(name).window == 2
        # the young FM judged on both tenants' posts, though one slot lets only one run at a time: the first at the
        # FM's first labeled window gives up its slot unjudged (window untrained) and judges when it comes back
        assert history(storage, name)[1]["young_fm_pooled"] == healthy, name
    assert max(runs[n]["starts"] for n in healthy) >= 2, runs  # a run gave up the slot and came back


def test_without_follow_runs_sharing_one_slot_judge_the_young_fm_on_the_same_posts(source, tmp_path):
    """Two one-tenant runs, one slot, windows 0-1, no --follow: a run then ends rather than takes turns, so the first
    at the FM's first labeled window gives its slot up unjudged (window untrained) to let the queued one post, and
    judges when it comes back. Without that the first judged on its own post only."""
    storage = tmp_path
    for t in range(2):
        commit(source, storage, t)
    reg = TenantRegistry(storage)
    healthy = ["feed", "stories"]
    for name in healthy:
        reg.add(TenantConfig(name=name, guard=False, student={"size": 1}, own_run=True))
    manager = start_tenant_manager(TenantManagerConfig(storage=str(storage), max_concurrent=1, poll_s=0.3))
    try:
        runs = ray.get(manager.train.remote(0, 1, False), timeout=600)["runs"]
    finally:
        ray.kill(manager)
    for name in healthy:
        h = history(storage, name)
        assert [r["window"] for r in h] == [0, 1] and h[1]["young_fm_pooled"] == healthy, (name, h[1])
    assert sorted(runs[n]["starts"] for n in healthy) == [1, 2], runs  # the first came back once


def test_exfm_metrics_reach_rays_prometheus_export_under_the_dashboards_names(ray_cluster):
    """What a window records (the DAS's record_metrics, a tenant gauge) is scraped from the node's
    metrics export with its values, under the names deploy/grafana/exfm-dashboard.json reads."""
    import urllib.request

    from exfm_ray.das.store import WindowRecord
    from exfm_ray.observability import exported_name
    from tests.unit.test_dashboard import code_metrics, dashboard_panels, panel_series

    @ray.remote(num_cpus=0)
    class Recorder:  # stays alive while the scrape waits: Ray pushes a process's metrics periodically
        def record(self, rec: WindowRecord) -> str:
            from exfm_ray.das.window_log import record_metrics
            from exfm_ray.observability import gauge

            record_metrics(rec)
            gauge("tenant_ne", "Tenant student ne on its latest window", ("tenant",)).set(0.875, {"tenant": "probe"})
            return ray.get_runtime_context().get_worker_id()

    rec = WindowRecord(window=0, input_rows=300, output_rows=300, fm_calls=120, masked_rows=30, duration_s=2.0)
    recorder = Recorder.remote()
    worker = ray.get(recorder.record.remote(rec))
    kinds = code_metrics()
    expected = {
        exported_name(kinds[name], name): value
        for name, value in [("das_rows", 300), ("das_masked_rows", 30), ("das_fm_calls", 120), ("das_rows_per_s", 150)]
    }
    expected[exported_name(kinds["tenant_ne"], "tenant_ne")] = 0.875
    assert set(expected) <= {s for p in dashboard_panels() for s in panel_series(p)}  # the names the panels read
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"

    def scraped():
        found = {}
        for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
            name = line.split("{", 1)[0]
            if name in expected and f'WorkerId="{worker}"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
        return found if set(found) == set(expected) else None

    try:
        assert wait_until(scraped, timeout_s=60, what="the exfm_ metrics in Ray's export") == pytest.approx(expected)
    finally:
        ray.kill(recorder)
