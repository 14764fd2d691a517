"""`exfm run` end to end on the shared local Ray: FM training job -> FM group -> DAS -> tenant
runs -> Ray Serve over HTTP -> report; then a rerun that continues instead of redoing.
One tenant reads LoopFM histories: the run folds each committed window into the store, and
Serve answers it from the newest store version."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actors.pipeline import run_pipeline
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.sources import SourceConfig
from exfm_ray.data.stream import window_dir
from exfm_ray.data.synthetic import SyntheticConfig
from exfm_ray.fm.config import FMConfig
from exfm_ray.fm.registry import FMRegistry
from exfm_ray.loopfm.builder import store_root
from exfm_ray.loopfm.store import StoreReader
from exfm_ray.pipeline.config import PipelineConfig
from exfm_ray.serving.deploy import free_port
from exfm_ray.students.guard import NE_KEY
from exfm_ray.students.store import StudentStore
from exfm_ray.tenants.config import TenantConfig
from exfm_ray.tenants.registry import TenantRegistry

pytestmark = pytest.mark.ray
WINDOWS = 4


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    from ray import serve

    storage = tmp_path_factory.mktemp("pipeline")
    cfg = PipelineConfig(
        source=SourceConfig(synthetic=SyntheticConfig(num_windows=WINDOWS, rows_per_window=10_000, num_tenants=2)),
        storage=str(storage),
        fm=FMConfig(size=2, batch_size=128),
        tenants=[
            TenantConfig(name="feed", control=True),
            TenantConfig(name="stories", control=True, variant="kd_sa+loopfm"),
        ],
        serve={"port": free_port(), "app_name": "students_pipeline", "reload_interval_s": 0.5, "replica_cpus": 0.5},
        latency_requests=20,
        sample_rows=16,
        # One tenant run for both, a one-rank FM training job and a one-rank FM group: what is asserted
        # here does not need more, and each Ray Train run or rank is a process importing torch
        # (test_tenant_training, test_fm_jobs and test_fm_group cover concurrent runs, 2-rank training
        # and sharded groups).
        max_concurrent_tenants=1,
        fm_workers=1,
        fm_shards=1,
    )
    lines = []
    report = run_pipeline(cfg, log=lines.append)
    yield cfg, report, lines
    serve.shutdown()  # the next module starts Serve with its own port


def test_every_row_is_augmented_and_every_window_trained(first_run):
    cfg, report, _ = first_run
    store = AugmentedStore(cfg.storage)
    records = store.records()
    assert sorted(records) == list(range(WINDOWS))
    for t, rec in records.items():
        ids = pq.read_table(window_dir(f"{cfg.storage}/stream", t), columns=["example_id"]).column("example_id")
        assert rec.input_rows == rec.output_rows == len(ids)
        unique = len(set(ids.to_pylist()))
        assert rec.fm_calls == (0 if t < cfg.fm_delay else unique) and unique < len(ids)  # once per example
    assert records[0].masked_rows == records[0].input_rows  # no FM before the first window
    assert all(records[t].fm_calls > 0 and records[t].masked_rows == 0 for t in range(1, WINDOWS))
    versions = FMRegistry(cfg.storage).versions()
    assert [v.through_window for v in versions] == list(range(WINDOWS - 1))  # one per window, streaming
    for tenant, h in report["windows"].items():
        assert [r["window"] for r in h] == list(range(WINDOWS)), tenant


def test_served_students_answer_like_the_in_process_students(first_run):
    cfg, report, _ = first_run
    served = report["serving"]["tenants"]
    store = StudentStore(cfg.storage)
    assert sorted(served) == ["feed", "stories"]
    for tenant, s in served.items():
        assert s["version"] == store.latest(tenant).version == f"g1-w{WINDOWS - 1:04d}"
        assert s["rows"] == cfg.sample_rows and s["max_abs_diff"] < 1e-5
        assert 0 < s["p50_ms"] <= s["p99_ms"]
    # the LoopFM tenant is answered from the newest store version (the parity above used it too)
    assert served["stories"]["store_version"] == WINDOWS - 1 and served["feed"]["store_version"] is None


def test_the_loopfm_store_has_one_version_per_window_read_one_window_late(first_run):
    cfg, report, lines = first_run
    manifest = StoreReader.open(store_root(cfg.storage)).manifest()
    assert sorted(int(t) for t in manifest) == list(range(WINDOWS))
    assert manifest["0"].entities == {"user_id": 0} and manifest[str(WINDOWS - 1)].entities["user_id"] > 0
    assert sum("LoopFM store version" in line for line in lines) == WINDOWS
    # each window of the LoopFM tenant read the version before it, never its own
    assert [r.get("store_version") for r in report["windows"]["stories"]] == [None, *range(WINDOWS - 1)]
    assert all("store_version" not in r for r in report["windows"]["feed"])


def test_report_shows_the_fm_helping_the_students(first_run):
    cfg, report, _ = first_run
    paths = report["paths"]
    saved = json.loads(Path(paths["json"]).read_text())
    overall = saved["all_tenants"]
    assert overall["ne_mean"] < overall["control_ne_mean"]  # ExFM column below the student-alone column
    # the guard's served model, beside the ExFM student and the control, per tenant and overall
    for name, s in [*saved["tenants"].items(), ("all", overall)]:
        assert 0 < s["served_ne_mean"] < 2 and "transfer_ratio" in s, name
        assert sum(s["served"].values()) > 0 and set(s["served"]) <= set(NE_KEY), name
    for h in report["windows"].values():
        for r in h:  # each window scores what the guard had published after the window before
            assert r["served_ne"] == r[NE_KEY[r["served"]]] and r["guard_reason"], r
    text = Path(paths["markdown"]).read_text()
    assert "| all tenants |" in text and "FM calls" in text
    system = {r["window"]: r for r in saved["system"]}
    assert system[0]["staleness_h"] is None and 0 < system[WINDOWS - 1]["staleness_h"] < 24
    assert all(r["fm_calls_per_row"] < 1 for t, r in system.items() if t >= cfg.fm_delay)  # shared examples


def test_a_rerun_continues_and_redoes_nothing(first_run):
    cfg, report, _ = first_run
    before = {n: len(TenantRegistry(cfg.storage).history(n)) for n in
              report["windows"]}  # fmt: skip
    versions = len(FMRegistry(cfg.storage).versions())
    loop_manifest = (store_root(cfg.storage) / "manifest.json").read_text()
    lines = []
    again = run_pipeline(cfg, log=lines.append)
    assert (store_root(cfg.storage) / "manifest.json").read_text() == loop_manifest  # no version rewritten
    assert not any("LoopFM store version" in line for line in lines)
    assert sum("already augmented" in line for line in lines) == WINDOWS
    # every tenant is through the last window: no run (Ray Train workers) is started for nothing
    assert sorted(line for line in lines if line.startswith("tenant ")) == [
        f"tenant {n}: finished, 0 run start(s)" for n in sorted(before)
    ]
    assert len(FMRegistry(cfg.storage).versions()) == versions
    assert {n: len(h) for n, h in again["windows"].items()} == before
    assert again["all_tenants"]["ne_mean"] == pytest.approx(report["all_tenants"]["ne_mean"])
