"""The DAS on a local CPU Ray: Ray Data through the FM group into committed Parquet windows."""

import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from actors.fm_group import FMGroupConfig
from actors.launch import start_fm_group, stop_fm_group
from exfm_ray.das.label_join import delayed_events
from exfm_ray.das.local import LocalLabeler, augment_table
from exfm_ray.das.pipeline import AugmentConfig, augment_windows
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.model import FMConfig, build_fm
from exfm_ray.fm.registry import FMRegistry, LeakageError, publish_model

pytestmark = pytest.mark.ray

KEY = [("example_id", "ascending"), ("tenant", "ascending")]
GROUP = "fm-das"


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("das")
    stream = SyntheticStream(SyntheticConfig(num_windows=4, rows_per_window=2500, num_tenants=3, overlap=0.2)).stream()
    stream.write(root / "stream", row_group_rows=500)  # several units per window
    torch.manual_seed(0)
    cfg = FMConfig(size=1)
    fm = build_fm(stream.spec, cfg).eval()
    version = publish_model(
        FMRegistry(root), fm, stream.spec, cfg, watermark=stream.spec.window_starts[1] - 1, through_window=0
    )
    group = start_fm_group(FMGroupConfig(name=GROUP, storage=str(root), call_timeout_s=20), detached=False)
    from jobs.common import quiet_ray_data

    quiet_ray_data()
    yield stream, root, LocalLabeler(fm, version), group
    stop_fm_group(GROUP)


def das_cfg(root, storage=None, **kw) -> AugmentConfig:
    kw.setdefault("unit_rows", 1000)  # windows of ~3,000 rows in several units
    return AugmentConfig(storage=str(storage or root), stream=str(root / "stream"), group_name=GROUP, **kw)


def reference(world, t):
    stream, _, labeler, _ = world
    return augment_table(stream.windows[t], labeler, stream.spec, labeler.model.hidden_dim).sort_by(KEY)


def comparable(table: pa.Table) -> pa.Table:
    return table.drop(["das_infer_ts"]).sort_by(KEY)


def test_window_is_augmented_completely_with_fm_outputs_equal_to_in_process(world):
    stream, root, labeler, _ = world
    [result] = augment_windows(das_cfg(root, batch_size=700, unit_rows=1000, workers=2), [1])
    rec = result["record"]
    assert len(list((root / "augmented" / "window=1").glob("part-*.parquet"))) >= 3  # one part per unit
    out = AugmentedStore(root).read_window(1).sort_by(KEY)
    ref = reference(world, 1)
    assert rec.input_rows == rec.output_rows == out.num_rows == stream.windows[1].num_rows
    unique = len(np.unique(stream.windows[1].column("example_id").to_numpy()))
    assert rec.fm_calls == unique < rec.input_rows  # one FM call per example shared by tenants
    heads = stream.spec.tenant_names
    expected = {*stream.windows[1].column_names, "fm_logit", "fm_mask", "fm_emb", "fm_version", "fm_data_watermark"}
    expected |= {f"fm_logit_{h}" for h in heads} | {f"fm_prob_{h}" for h in heads} | {"das_infer_ts"}
    assert set(out.column_names) == expected
    assert out.schema.field("fm_emb").type == pa.list_(pa.float32(), labeler.model.hidden_dim)
    assert out.column("example_id").to_pylist() == ref.column("example_id").to_pylist()
    for col in ("fm_logit", *[f"fm_prob_{h}" for h in heads]):
        np.testing.assert_allclose(out.column(col).to_numpy(), ref.column(col).to_numpy(), atol=1e-5)
    assert out.column("fm_mask").to_pylist() == [True] * out.num_rows
    assert rec.fm_versions == ["fm-0001"] and rec.masked_rows == 0


def test_rerun_of_a_finished_window_is_a_no_op(world):
    _, root, _, _ = world
    files = sorted((root / "augmented" / "window=1").glob("*"))
    stamp = [f.stat().st_mtime_ns for f in files]
    [result] = augment_windows(das_cfg(root), [1])
    assert result["status"] == "already_done"
    assert [f.stat().st_mtime_ns for f in sorted((root / "augmented" / "window=1").glob("*"))] == stamp


@pytest.mark.parametrize("crash", ["after_fm_pass", "after_write"])
def test_a_run_killed_mid_window_leaves_nothing_visible_and_a_rerun_gives_identical_rows(world, crash, tmp_path):
    _, root, _, _ = world
    storage = _linked_storage(root, tmp_path)
    cfg = das_cfg(root, storage=storage)
    code = (
        "import ray, sys; from exfm_ray.das import pipeline; from exfm_ray.das.pipeline import AugmentConfig, "
        f"augment_windows; pipeline.CRASH_AT = {crash!r}; "
        f"ray.init(address={ray.get_runtime_context().gcs_address!r}, log_to_driver=False); "
        f"augment_windows(AugmentConfig.model_validate_json({cfg.model_dump_json()!r}), [2])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    store = AugmentedStore(storage)
    assert store.committed() == [] and not (storage / "augmented" / "window=2").exists()
    [result] = augment_windows(cfg, [2])
    assert result["status"] == "committed" and store.committed() == [2]
    out, ref = comparable(store.read_window(2)), reference(world, 2)
    keys = list(zip(out.column("example_id").to_pylist(), out.column("tenant").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == ref.num_rows  # same rows: no duplicates, no losses
    assert out.column("example_id").to_pylist() == ref.column("example_id").to_pylist()
    np.testing.assert_allclose(out.column("fm_logit").to_numpy(), ref.column("fm_logit").to_numpy(), atol=1e-5)


def test_a_rank_killed_during_a_window_still_yields_a_complete_window(world, tmp_path):
    stream, root, _, group = world
    storage = _linked_storage(root, tmp_path)
    calls_before = ray.get(group.status.remote()).calls
    results = []
    worker = threading.Thread(
        target=lambda: results.extend(augment_windows(das_cfg(root, storage=storage, batch_size=250), [3]))
    )
    worker.start()
    while ray.get(group.status.remote()).calls <= calls_before:
        time.sleep(0.2)
    ray.kill(ray.get(group.rank_handles.remote())[0], no_restart=True)
    worker.join(timeout=300)
    assert results and results[0]["status"] == "committed"
    rec = results[0]["record"]
    assert rec.output_rows == stream.windows[3].num_rows and rec.masked_rows == 0  # waited for the rebuild
    out = comparable(AugmentedStore(storage).read_window(3))
    np.testing.assert_allclose(
        out.column("fm_logit").to_numpy(), reference(world, 3).column("fm_logit").to_numpy(), atol=1e-5
    )
    assert ray.get(group.status.remote()).gangs[0].rebuilds >= 1


def test_fm_down_past_the_wait_gives_masked_rows_never_dropped(world, tmp_path):
    stream, root, _, group = world
    _wait_ready(group)
    storage = _linked_storage(root, tmp_path)
    ray.kill(ray.get(group.rank_handles.remote())[1], no_restart=True)
    [result] = augment_windows(das_cfg(root, storage=storage, max_wait_s=0, batch_size=100_000), [2])
    rec = result["record"]
    assert rec.output_rows == stream.windows[2].num_rows and rec.masked_rows == rec.output_rows
    assert rec.unlabeled_rows == rec.output_rows
    out = AugmentedStore(storage).read_window(2)
    assert out.column("fm_logit").null_count == out.num_rows
    _wait_ready(group)


def test_a_range_of_windows_is_committed_in_the_order_given_with_every_row_once(world, tmp_path):
    stream, root, _, _ = world
    storage = _linked_storage(root, tmp_path)
    seen = []
    # Small batches: many per window, both windows in one Ray Data job.
    cfg = das_cfg(root, storage=storage, batch_size=300)
    results = augment_windows(cfg, [3, 2], lambda r: seen.append(r["window"]))
    assert [(r["window"], r["status"]) for r in results] == [(3, "committed"), (2, "committed")] and seen == [3, 2]
    store = AugmentedStore(storage)
    records = store.records()
    assert records[3].committed_at <= records[2].committed_at
    for t in (2, 3):
        out, ref = comparable(store.read_window(t)), reference(world, t)
        keys = list(zip(out.column("example_id").to_pylist(), out.column("tenant").to_pylist(), strict=True))
        assert len(keys) == len(set(keys)) == ref.num_rows == records[t].output_rows
        np.testing.assert_allclose(out.column("fm_logit").to_numpy(), ref.column("fm_logit").to_numpy(), atol=1e-5)
        assert records[t].fm_calls == len(np.unique(stream.windows[t].column("example_id").to_numpy()))
        assert records[t].masked_rows == 0 and records[t].fm_versions == ["fm-0001"]


def test_leakage_guard_refuses_a_too_new_fm_version(world):
    _, root, _, _ = world
    with pytest.raises(LeakageError, match="window 0"):
        augment_windows(das_cfg(root), [0])
    assert 0 not in AugmentedStore(root).committed()


def test_delayed_labels_are_joined_within_the_attribution_window(world, tmp_path):
    stream, root, _, group = world
    _wait_ready(group)
    storage = _linked_storage(root, tmp_path)
    events = delayed_events(stream.windows[2], stream.spec, mean_delay_s=3600, seed=1)
    early = events.filter(pa.compute.less(events.column("label_time"), stream.spec.window_starts[3]))
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    pq.write_table(early, labels_dir / "part-0.parquet")
    cfg = das_cfg(root, storage=storage, labels={"path": str(labels_dir), "attribution_s": 7200})
    [first] = augment_windows(cfg, [2])
    assert first["status"] == "waiting_for_labels"  # the label stream has not closed the window yet
    calls = ray.get(group.status.remote()).calls
    pq.write_table(events, labels_dir / "part-0.parquet")  # every event has now arrived ...
    (labels_dir / "WATERMARK").write_text(str(stream.spec.window_starts[3] + 7200))  # ... and the stream says so
    [second] = augment_windows(cfg, [2])
    assert second["status"] == "committed"
    assert ray.get(group.status.remote()).calls == calls  # the FM labels were staged, not recomputed
    out = AugmentedStore(storage).read_window(2)
    truth = stream.windows[2]
    delay = dict(zip(events.column("example_id").to_pylist(), events.column("label_time").to_pylist(), strict=True))
    want = [
        1.0 if y == 1.0 and delay[i] - et <= 7200 else 0.0
        for i, et, y in zip(
            truth.column("example_id").to_pylist(),
            truth.column("event_time").to_pylist(),
            truth.column("label_click").to_pylist(),
            strict=True,
        )
    ]
    got = dict(
        zip(
            zip(out.column("example_id").to_pylist(), out.column("tenant").to_pylist(), strict=False),
            out.column("label_click").to_pylist(),
            strict=False,
        )
    )
    assert [
        got[k] for k in zip(truth.column("example_id").to_pylist(), truth.column("tenant").to_pylist(), strict=False)
    ] == want
    join = second["record"].label_join
    assert join["positive"] == sum(want) and join["late_events"] > 0


def _linked_storage(root, tmp_path):
    """A fresh augmented store that shares the FM registry of the module's storage."""
    storage = tmp_path / "store"
    (storage / "fm").mkdir(parents=True)
    (storage / "fm" / "registry.json").write_text((root / "fm" / "registry.json").read_text())
    (storage / "fm" / "versions").symlink_to(root / "fm" / "versions")
    return storage


def _wait_ready(group, timeout=180):
    deadline = time.time() + timeout
    while not all(g.status == "ready" for g in ray.get(group.status.remote()).gangs):
        assert time.time() < deadline
        time.sleep(0.5)
