"""LoopFM in the run: the store folded from the DAS's committed windows, tenant runs reading the
version before their window, and the served student reading the newest version by entity."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.errors import ConfigError, ExfmError
from exfm_ray.fm.config import FMConfig
from exfm_ray.loopfm.builder import fold_augmented, open_run_store, store_config_for, store_root
from exfm_ray.loopfm.features import history_columns, row_histories
from exfm_ray.loopfm.store import KeyTable, RepresentationStore, StoreConfig, StoreReader, StoreView, entity_ids
from exfm_ray.serving.check import http_rows
from exfm_ray.serving.config import ServeConfig
from exfm_ray.serving.direct import build_direct_api
from exfm_ray.serving.histories import EntityVectors, first_ids
from exfm_ray.serving.rows import EncodedRows
from exfm_ray.students.meta import student_meta
from exfm_ray.students.store import StudentStore
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.run import TenantRun
from exfm_ray.tenants.trainer import _Member

pytestmark = pytest.mark.unit
WINDOWS = 3
USERS = 1000
LOOP = {"student": {"batch_size": 64, "loopfm": {"store": {"k": 4}}}, "variant": "kd_sa+loopfm"}


@pytest.fixture(scope="module")
def run_storage(tmp_path_factory):
    """Augmented windows and the store folded from them, as `exfm run` leaves them."""
    root = tmp_path_factory.mktemp("loopfm-run")
    cfg = SyntheticConfig(num_windows=WINDOWS, rows_per_window=1500, num_tenants=2, num_users=USERS)
    augment_stream_locally(SyntheticStream(cfg).stream(), root, FMConfig(size=1))
    augmented = AugmentedStore(root)
    store_cfg = store_config_for([TenantConfig(name="feed", **LOOP)])
    store = RepresentationStore(store_root(root), store_cfg, _dim(augmented))
    assert fold_augmented(augmented, store) == list(range(WINDOWS))
    return root, augmented


def _dim(augmented: AugmentedStore) -> int:
    return pq.read_schema(augmented.window_files(0)[0]).field("fm_emb").type.list_size


@pytest.mark.parametrize("order", ["in time order", "out of order"])
def test_folding_unit_by_unit_equals_folding_the_window_whole(run_storage, tmp_path, order):
    root, augmented = run_storage
    split = tmp_path / "split"
    shutil.copytree(root / "augmented", split / "augmented")
    for t in range(WINDOWS):  # two unit files per window, cut between two examples
        [path] = AugmentedStore(split).window_files(t)
        table = pq.read_table(path).sort_by([("event_time", "ascending"), ("example_id", "ascending")])
        ids = table.column("example_id").to_numpy()
        cut = int(np.flatnonzero(ids[1:] != ids[:-1])[len(ids) // 3]) + 1
        path.unlink()
        first, second = ("00000", "00001") if order == "in time order" else ("00001", "00000")
        pq.write_table(table.slice(0, cut), path.parent / f"part-{first}.parquet")
        pq.write_table(table.slice(cut), path.parent / f"part-{second}.parquet")
    reader = StoreReader.open(store_root(root))
    streamed = RepresentationStore(tmp_path / "streamed", reader.cfg, reader.dim)
    assert fold_augmented(AugmentedStore(split), streamed) == list(range(WINDOWS))
    whole, parts = reader.version_view(WINDOWS - 1), streamed.view(WINDOWS)
    users = np.arange(USERS)
    np.testing.assert_array_equal(whole.history("user_id", users)[1], parts.history("user_id", users)[1])
    np.testing.assert_allclose(whole.history("user_id", users)[0], parts.history("user_id", users)[0])
    with pytest.raises(ConfigError, match="was built with"):  # one store, one config and dim
        RepresentationStore(store_root(root), StoreConfig(k=2), reader.dim)


def test_a_loopfm_tenant_reads_the_version_before_its_window_and_resumes_exactly(run_storage):
    root, augmented = run_storage
    reader = StoreReader.open(store_root(root))
    view = resolve(TenantConfig(name="feed", **LOOP), augmented.spec())
    torch.set_num_threads(1)

    def window(run, t, version=None):
        store = reader.view(t) if version is None else reader.version_view(version)
        return run.window(t, augmented.read_window(t, columns=view.columns), store=store)

    straight = TenantRun(view, fm_dim=reader.dim)
    records = [window(straight, t) for t in range(WINDOWS)]
    assert [r["store_version"] for r in records] == [None, 0, 1]
    assert straight.learner.model.loop is not None
    with pytest.raises(ExfmError, match="may not read store version 2"):
        window(TenantRun(view, fm_dim=reader.dim), 2, version=2)  # its own window's events
    with pytest.raises(ExfmError, match="needs a store view"):
        TenantRun(view, fm_dim=reader.dim).window(0, augmented.read_window(0, columns=view.columns))
    resumed = TenantRun(view, fm_dim=reader.dim)
    for t in range(2):
        window(resumed, t)
    again = TenantRun(view, fm_dim=reader.dim)
    again.load_state_dict(resumed.state_dict())
    np.testing.assert_allclose(window(again, 2)["ne"], records[2]["ne"], rtol=1e-6)


def test_a_loopfm_member_waits_for_the_store_version_before_its_window(tmp_path):
    store = RepresentationStore(tmp_path, StoreConfig(), dim=2)
    member = _Member(entry=None, run=None, files=None, next=2, loop=StoreReader.open(tmp_path))
    assert not member.ready({0, 1, 2})
    none = {"user_id": (np.zeros(0, np.int64), np.zeros(0, bool))}
    store.fold_arrays(0, none, np.zeros((0, 2), np.float32))
    assert not member.ready({0, 1, 2})
    store.fold_arrays(1, none, np.zeros((0, 2), np.float32))
    assert member.ready({0, 1, 2}) and not member.ready({0, 1})
    assert _Member(entry=None, run=None, files=None, next=2).ready({2})  # no LoopFM: the window only


def test_the_run_store_holds_every_tenants_keys_and_keys_must_be_features(run_storage, tmp_path):
    _, augmented = run_storage
    a = TenantConfig(name="feed", **LOOP)
    b = TenantConfig(name="stories", variant="loopfm", student={"loopfm": {"store": {"keys": ["ad_id"], "k": 2}}})
    cfg = store_config_for([a, b, TenantConfig(name="x")])
    assert cfg.keys == ["user_id", "ad_id"] and cfg.k == 4
    assert store_config_for([TenantConfig(name="x")]) is None
    bad = TenantConfig(name="feed", features=["ad_id"], **LOOP)
    with pytest.raises(ConfigError, match="student.loopfm.store.keys"):
        resolve(bad, augmented.spec())
    # a rerun after tenants came or went reads the store as first built; what it cannot hold is refused
    assert open_run_store(tmp_path, [a, b], dim=3).cfg == cfg
    assert open_run_store(tmp_path, [b], dim=3).cfg == cfg  # 'feed' removed: same store
    small = TenantConfig(name="new", variant="loopfm", student={"loopfm": {"store": {"k": 1}}})
    assert open_run_store(tmp_path, [small], dim=3).cfg == cfg
    big = TenantConfig(name="big", variant="loopfm", student={"loopfm": {"store": {"k": 16}}})
    with pytest.raises(ConfigError, match="'big': student.loopfm.store.k 16"):
        open_run_store(tmp_path, [a, big], dim=3)
    other = TenantConfig(name="dev", variant="loopfm", student={"loopfm": {"store": {"keys": ["device"]}}})
    with pytest.raises(ConfigError, match=r"'dev': student.loopfm.store.keys \['device'\]"):
        open_run_store(tmp_path, [other], dim=3)


def test_a_reader_with_a_smaller_k_reads_its_last_k_events():
    store = StoreView(0, {"user_id": KeyTable(4, 1, "float32")})
    store.tables["user_id"].fold(np.array([7, 7, 7, 8]), np.array([[1.0], [2.0], [3.0], [9.0]], np.float32), 0)
    entities = {"user_id": (np.array([7, 8, 5, 7]), np.array([True, True, True, False]))}
    hist, kept = history_columns(store, ["user_id"], entities, k=2)
    assert hist[:, 0, :, 0].tolist() == [[2.0, 3.0], [0.0, 9.0], [0.0, 0.0], [0.0, 0.0]]
    assert kept[:, 0].tolist() == [2, 1, 0, 0]  # an unseen entity and a row without an id: none
    repeated = {"user_id": (np.array([7, 7, 8, 7, 8]), np.ones(5, bool))}
    full = row_histories(store, ["user_id"], repeated)
    assert len(full.hist[0]) == 2 and full.rows(0, 5)[0].shape == (5, 1, 4, 1)  # held once per entity
    assert full.rows(1, 3)[0][:, 0, :, 0].tolist() == [[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 9.0]]
    # mean/sum/last pooled once per entity: the tower answers exactly as on the K events
    from exfm_ray.loopfm.features import LoopTower

    mixed = {"user_id": (np.array([7, 8, 5, 7]), np.array([True, True, True, False]))}
    for pooling in ("mean", "sum", "last"):
        tower = LoopTower(1, 1, 2, pooling)
        torch.nn.init.normal_(tower.proj[0].weight)
        torch.nn.init.normal_(tower.missing)
        pooled = row_histories(store, ["user_id"], mixed, pooling=pooling)
        assert pooled.hist[0].shape[1] == 1, pooling
        with torch.no_grad():
            want = tower(*row_histories(store, ["user_id"], mixed).rows(0, 4))
            np.testing.assert_allclose(tower(*pooled.rows(0, 4)), want, rtol=1e-6, err_msg=pooling)


def test_a_served_loopfm_student_answers_from_the_newest_store_version(run_storage, tmp_path):
    root, augmented = run_storage
    reader = StoreReader.open(store_root(root))
    view = resolve(TenantConfig(name="feed", **LOOP), augmented.spec())
    run = TenantRun(view, fm_dim=reader.dim)
    for t in range(WINDOWS):
        run.window(t, augmented.read_window(t, columns=view.columns), store=reader.view(t))
    meta = student_meta(view.spec, "feed", view.tenant.student, version="v1", window=WINDOWS - 1)
    StudentStore(root).publish(run.learner.model, meta)
    client = TestClient(build_direct_api(ServeConfig(store_root=str(root))))
    table = view.select(augmented.read_window(WINDOWS - 1, columns=view.columns)).slice(0, 16)
    rows = http_rows(table, view)
    answer = client.post("/v1/tenants/feed/predict", json={"rows": rows}).json()
    assert answer["store_version"] == WINDOWS - 1  # the newest version, not the one it trained with
    newest = reader.version_view(WINDOWS - 1)
    keys = ["user_id"]
    hist, kept = history_columns(newest, keys, {k: entity_ids(table, k) for k in keys})
    assert kept.max() > 0  # some of these users have histories: the lookup is exercised
    model = run.learner.model.serving_model().eval()
    from exfm_ray.data.batching import WindowTensors

    batch = WindowTensors(table, view.spec).batch(0, 16, view.spec.tenants[0].features, view.spec.tenants[0].dense)
    with torch.no_grad():
        expected = model(batch.sparse, batch.dense, (torch.from_numpy(hist), torch.from_numpy(kept))).numpy()
        unseen = model(batch.sparse, batch.dense).numpy()
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-6)
    assert np.abs(expected - unseen).max() > 1e-4  # the histories change the answer
    # per entity, precomputed at load, equals the tower on the fly, also for a reader of fewer events
    users = entity_ids(table, "user_id")[0].tolist() + [_unseen_user(newest, view)]
    encoded = EncodedRows(len(users), {"user_id": users}, {"user_id": [1] * len(users)}, [[]] * len(users))
    for k in (4, 2):
        on_the_fly = history_columns(newest, keys, {"user_id": (np.array(users), np.ones(len(users), bool))}, k)
        with torch.no_grad():
            want = model.loop(*(torch.from_numpy(x) for x in on_the_fly))
        np.testing.assert_allclose(EntityVectors(model.loop, newest, keys, k).lookup([encoded]), want, atol=1e-6)
    stranger = [{**rows[0], "sparse": {**rows[0]["sparse"], "user_id": [_unseen_user(newest, view)]}}]
    reply = client.post("/v1/tenants/feed/predict", json={"rows": stranger})
    assert reply.status_code == 200 and 0 < reply.json()["probabilities"][0] < 1


def _unseen_user(store_view, view) -> int:
    card = next(f.cardinality for f in view.spec.sparse if f.name == "user_id")
    known = set(store_view.tables["user_id"].index)
    return next(u for u in range(card) if u not in known)


def test_first_ids_follow_the_rows_of_every_request():
    parts = [
        EncodedRows(2, {"user_id": [5, 6, 7]}, {"user_id": [2, 1]}, [[], []]),
        EncodedRows(1, {"user_id": []}, {"user_id": [0]}, [[]]),
    ]
    ids, present = first_ids(parts, "user_id")
    assert ids.tolist() == [5, 7, 0] and present.tolist() == [True, True, False]
