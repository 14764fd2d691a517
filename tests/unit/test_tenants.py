"""Tenants without Ray: config checks against the stream, the registry, the one tenant loop and
its checkpoint state, the report."""

import io
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.errors import ConfigError
from exfm_ray.fm.config import FMConfig
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.registry import TenantRegistry
from exfm_ray.tenants.report import write_report
from exfm_ray.tenants.run import TenantRun
from jobs.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    stream = SyntheticStream(SyntheticConfig(num_windows=3, rows_per_window=1500, num_tenants=3)).stream()
    stream.write(root / "stream")
    augment_stream_locally(stream, root, FMConfig(size=1))
    return root, AugmentedStore(root)


def test_a_tenant_defaults_to_its_stream_tenants_rows_features_and_task(augmented):
    _, store = augmented
    spec = store.spec()
    view = resolve(TenantConfig(name="stories"), spec)
    stream_tenant = spec.tenant("stories")
    assert view.sources == ["stories"]
    assert view.spec.tenants[0].features == stream_tenant.features
    assert view.spec.tasks == [stream_tenant.task]
    table = view.select(store.read_window(1, columns=view.columns))
    original = store.read_window(1, tenant="stories")
    assert table.num_rows == original.num_rows > 0
    assert set(table.column("tenant").to_pylist()) == {"stories"}
    # several sources: rows of both, features both log
    both = resolve(TenantConfig(name="mix", rows=["feed", "stories"]), spec)
    assert "feed_slot" not in both.spec.tenants[0].features and "user_id" in both.spec.tenants[0].features
    rows = both.select(store.read_window(1, columns=both.columns))
    assert rows.num_rows == original.num_rows + store.read_window(1, tenant="feed").num_rows


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"name": "x", "rows": ["feed"], "features": ["user_id", "nope"]}, "'features'"),
        ({"name": "x", "rows": ["nobody"]}, "'rows'"),
        ({"name": "unknown_tenant"}, "'rows'"),
        ({"name": "x", "rows": ["feed"], "dense": ["nope"]}, "'dense'"),
        ({"name": "x", "rows": ["feed"], "task": "buy"}, "'task'"),
        ({"name": "bad/name", "rows": ["feed"]}, "'name'"),
    ],
)
def test_a_tenant_naming_unknown_things_is_rejected_with_the_field(augmented, cfg, field):
    _, store = augmented
    with pytest.raises(ConfigError, match=field):
        resolve(TenantConfig.parse(cfg), store.spec())


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"name": "x", "knobs": {"w": -1}}, "knobs.w"),
        ({"name": "x", "variant": "magic"}, "variant"),
        ({"name": "x", "student": {"size": 0}}, "student.size"),
        ({"name": "x", "workers": 0}, "workers"),
        ({"name": "x", "typo": 1}, "typo"),
    ],
)
def test_invalid_knobs_are_rejected_with_the_field(cfg, field):
    with pytest.raises(ConfigError, match=field):
        TenantConfig.parse(cfg)


def test_registry_add_remove_and_a_new_generation_after_removal(tmp_path):
    reg = TenantRegistry(tmp_path)
    reg.add(TenantConfig(name="feed"))
    with pytest.raises(ConfigError, match="already registered"):
        reg.add(TenantConfig(name="feed"))
    assert reg.get("feed").run_name == "feed-g1"
    reg.remove("feed")
    assert reg.active() == []
    with pytest.raises(ConfigError, match="no active tenant"):
        reg.remove("feed")
    again = reg.add(TenantConfig(name="feed", variant="vm_only"))
    assert again.run_name == "feed-g2" and reg.get("feed").config.variant == "vm_only"


def test_concurrent_registrations_lose_nothing(tmp_path):
    reg = TenantRegistry(tmp_path)
    threads = [threading.Thread(target=reg.add, args=(TenantConfig(name=f"t{i}"),)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(reg.entries()) == sorted(f"t{i}" for i in range(16))


def test_a_restored_run_continues_exactly_like_an_uninterrupted_one(augmented):
    _, store = augmented
    view = resolve(TenantConfig(name="feed", control=True, student={"batch_size": 64}), store.spec())
    torch.set_num_threads(1)
    straight = TenantRun(view)
    records = [straight.window(t, store.read_window(t, columns=view.columns)) for t in range(3)]
    assert [r["window"] for r in straight.history] == [0, 1, 2]
    assert "fm_ne" not in records[0] and records[1]["fm_rows"] == records[1]["rows"]  # window 0: no FM yet
    assert records[2]["ne"] < records[0]["ne"]

    first = TenantRun(view)
    first.window(0, store.read_window(0, columns=view.columns))
    first.window(1, store.read_window(1, columns=view.columns))
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)  # what a checkpoint holds
    saved.seek(0)
    resumed = TenantRun(view)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    last = resumed.window(2, store.read_window(2, columns=view.columns))
    assert resumed.last_window == 2 and [r["window"] for r in resumed.history] == [0, 1, 2]
    for key in ("ne", "auc", "control_ne", "loss"):
        np.testing.assert_allclose(last[key], records[2][key], rtol=1e-5)
    assert resumed.healthy()


def test_report_summarizes_what_the_windows_say(tmp_path):
    histories = {
        "feed": [
            {"window": 0, "ne": 2.0, "control_ne": 2.0, "auc": 0.5},
            {
                "window": 1,
                "ne": 0.9,
                "control_ne": 1.0,
                "fm_ne": 0.8,
                "auc": 0.7,
                "young_fm_on": False,
                "young_fm_z": 1.5,
                "young_fm_tenants": 2,
                "young_fm_pooled": ["feed", "search"],
            },
            {"window": 2, "ne": 0.8, "control_ne": 0.9, "fm_ne": 0.7, "auc": 0.8},
        ]
    }
    paths = write_report(histories, tmp_path, warmup=1)
    summary = json.loads(paths["json"].read_text())["summary"]["feed"]
    assert summary["ne_mean"] == pytest.approx(0.85) and summary["control_ne_mean"] == pytest.approx(0.95)
    assert summary["fm_ne_mean"] == pytest.approx(0.75) and summary["first_ne"] == 2.0
    assert summary["transfer_ratio"] == pytest.approx((0.95 - 0.85) / (0.95 - 0.75))
    assert summary["young_fm"] == {"on": False, "z": 1.5, "tenants": 2, "pooled": ["feed", "search"]}
    assert "(its ranking against the students', pooled over tenants): feed off (z +1.50, 2 tenants)." in (
        paths["markdown"].read_text()
    )
    assert (
        "| feed | 3 | 0.8500 | 0.9500 | -10.53% | n/a | - | 0.7500 | 0.50 | 0.7500 |" in paths["markdown"].read_text()
    )
    assert paths["plot"].stat().st_size > 10_000


def test_tenants_cli_validates_before_registering(augmented, monkeypatch, capsys, tmp_path):
    root, _ = augmented
    monkeypatch.setattr("jobs.cluster.try_connect", lambda address: False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [feed]\nfeatures: [user_id, nope]\n")
    assert main(["tenants", "add", "x", "--config", str(bad), "--storage", str(root)]) == 2
    assert "field 'features'" in capsys.readouterr().err
    assert main(["tenants", "add", "stories", "--storage", str(root)]) == 0
    assert main(["tenants", "list", "--json", "--storage", str(root)]) == 0
    rows = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [(r["tenant"], r["status"], r["windows_trained"]) for r in rows] == [("stories", "active", 0)]
    assert main(["tenants", "remove", "stories", "--storage", str(root)]) == 0
    assert TenantRegistry(root).get("stories").status == "removed"


def test_the_documented_tenant_yaml_resolves_against_the_synthetic_stream(augmented):
    from pathlib import Path

    from jobs.tenants_cmd import tenant_config

    _, store = augmented
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "tenant.yaml"
    view = resolve(TenantConfig.parse(tenant_config("feed_small", path)), store.spec())
    assert view.sources == ["feed"] and view.tenant.control and view.spec.tenants[0].dense == ["bid"]


def test_a_waiting_run_rewrites_its_progress_only_when_something_changes(tmp_path):
    from exfm_ray.tenants.outputs import TenantFiles

    reg = TenantRegistry(tmp_path)
    entry = reg.add(TenantConfig(name="feed"))
    files = TenantFiles(str(tmp_path), entry, reg, rank=0, progress_every_s=60)
    path = reg.progress_path("feed")

    def written():
        return reg.read_json(path)["updated_at"]

    files.progress(0, 3, "waiting", 0, 0)
    first = written()
    files.progress(0, 3, "waiting", 0, 0)  # a poll that found nothing new: no write
    assert written() == first
    files.progress(0, 3, "train", 0, 10)  # a new phase: written at once
    assert reg.read_json(path)["phase"] == "train"
    files.progress(1, 4, "waiting", 0, 0)
    assert reg.read_json(path)["window"] == 4 and reg.read_json(path)["phase"] == "waiting"


def test_a_declared_spec_is_readable_before_any_window_and_commits_keep_it(augmented, tmp_path):
    _, source = augmented
    store = AugmentedStore(tmp_path)
    store.declare_spec(source.spec())
    assert store.spec() == source.spec() and store.committed() == []
    staged = store.staging_dir("t") / "window=0"
    shutil.copytree(source.window_dir(0), staged)
    store.commit(0, staged, source.records()[0], source.spec())
    assert store.committed() == [0] and store.read_window(0).num_rows == source.read_window(0).num_rows


def test_a_rerun_starts_runs_only_for_tenants_not_done_with_the_plan(tmp_path, monkeypatch):
    """The manager's plan covers windows 0..3. `done` ended this generation's run after window 3:
    no run for it. `crashed` stopped after window 3's metrics, before its run ended (the publish may
    be missing): a run, whose restore republishes. `readded` was done in generation 1, then removed
    and added again: generation 2 trains afresh. (Runs are the seam here: `fit_tenant` is recorded.)"""
    import asyncio
    import json

    import actors.tenant_manager as tm
    from exfm_ray.tenants.config import TenantConfig
    from exfm_ray.tenants.registry import TenantRegistry

    hosted = []
    monkeypatch.setattr(tm, "fit_tenant", lambda cfg: hosted.append(cfg.key) or {"tenants": {}})
    reg = TenantRegistry(tmp_path)

    def progress(name, run, phase):  # each has metrics through window 3 (they outlive a generation)
        reg.progress_path(name).parent.mkdir(parents=True, exist_ok=True)
        reg.progress_path(name).write_text(json.dumps({"run": run, "phase": phase, "window": 3}))
        reg.metrics_path(name).write_text(json.dumps([{"window": t} for t in range(4)]))

    progress("done", reg.add(TenantConfig(name="done")).run_name, "done")
    progress("crashed", reg.add(TenantConfig(name="crashed")).run_name, "train")
    progress("readded", reg.add(TenantConfig(name="readded")).run_name, "done")
    reg.remove("readded")
    assert reg.add(TenantConfig(name="readded")).generation == 2

    manager = tm.TenantManager(tm.TenantManagerConfig(storage=str(tmp_path), max_concurrent=2, poll_s=0.01))
    runs = asyncio.run(manager.train(0, 3))["runs"]
    assert {n: r["starts"] for n, r in runs.items()} == {"done": 0, "crashed": 1, "readded": 1}
    assert len(hosted) == 2  # a run each (room for 2); none for `done`
    assert all(r["status"] == "finished" for r in runs.values())


def test_the_manager_writes_a_tenants_progress_while_no_run_of_it_does(tmp_path, monkeypatch):
    """A tenant is "queued" while its run waits for a slot, "starting" once it holds one (before any worker), "failed"
    with its run: the young FM's board waits only for tenants in training (young_board.awaited). One slot, a run
    each; the runs are the seam (`fit_tenant` records what the progress said when it was called)."""
    import asyncio

    import actors.tenant_manager as tm
    from exfm_ray.tenants.config import TenantConfig
    from exfm_ray.tenants.registry import TenantRegistry

    reg = TenantRegistry(tmp_path)
    seen = []

    def fit(cfg):
        seen.append({n: reg.progress(n).get("phase") for n in ("a", "b")})
        if cfg.lead.config.name == "b":
            raise RuntimeError("workers lost")
        return {"tenants": {}}

    monkeypatch.setattr(tm, "fit_tenant", fit)
    for name in ("a", "b"):
        reg.add(TenantConfig(name=name, own_run=True))
    manager = tm.TenantManager(tm.TenantManagerConfig(storage=str(tmp_path), max_concurrent=1, poll_s=0.01))
    runs = asyncio.run(manager.train(0, 3))["runs"]
    assert seen == [{"a": "starting", "b": "queued"}, {"a": "starting", "b": "starting"}]
    assert runs["b"]["status"] == "failed" and reg.progress("b")["phase"] == "failed"
    assert "workers lost" in reg.progress("b")["error"] and reg.progress("b")["run"] == "b-g1"


def test_a_run_whose_tenants_fit_no_stream_fails_before_any_worker_starts(augmented, tmp_path, monkeypatch):
    """`broken`'s rows name no stream tenant: its run fails in `fit_tenant` with the field, as its worker
    would, and no Ray Train run is built. A run with one member that fits, or with nothing committed
    yet to check against, is launched. (The trainer is the seam: building it is recorded.)"""
    import exfm_ray.tenants.trainer as tr

    launched = []

    class Launched(Exception):
        pass

    def launch(cfg):
        launched.append(cfg.key)
        raise Launched

    monkeypatch.setattr(tr, "build_tenant_trainer", launch)
    reg = TenantRegistry(tmp_path)
    broken = reg.add(TenantConfig(name="broken", rows=["no_such_tenant"]))
    good = reg.add(TenantConfig(name="feed"))
    plan = tr.WindowPlan(last_window=2)

    def run(lead, key=""):
        return tr.fit_tenant(tr.TenantRunConfig(storage=str(tmp_path), lead=lead, key=key, plan=plan))

    with pytest.raises(Launched):
        run(broken)  # nothing committed: nothing to check against yet
    AugmentedStore(tmp_path).declare_spec(augmented[1].spec())
    got = run(broken)["tenants"]["broken"]
    assert got["status"] == "failed" and "'rows'" in got["error"] and "no_such_tenant" in got["error"]
    assert reg.read_json(reg.progress_path("broken"))["phase"] == "failed"
    assert launched == ["solo-broken"]
    with pytest.raises(Launched):
        run(good)
    reg.members_path("group-1").parent.mkdir(parents=True, exist_ok=True)
    reg.members_path("group-1").write_text(json.dumps(["broken", "feed"]))
    with pytest.raises(Launched):
        run(broken, key="group-1")  # one member fits: the run starts; `broken` fails inside it alone
    assert launched == ["solo-broken", "solo-feed", "group-1"]
