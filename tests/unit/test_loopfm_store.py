"""The representation store: per-entity histories, versions written once, no leakage, a size bound."""

import numpy as np
import pyarrow as pa
import pytest

from exfm_ray.errors import ConfigError, DataError
from exfm_ray.loopfm.store import RepresentationStore, StoreConfig

DIM = 3


def window_table(users: list[int], values: list[float]) -> pa.Table:
    emb = np.repeat(np.array(values, np.float32)[:, None], DIM, axis=1)
    return pa.table(
        {
            "user_id": pa.array([[u] for u in users], pa.list_(pa.int64())),
            "fm_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM),
        }
    )


def first_dim(view, users):
    hist, kept = view.history("user_id", np.array(users))
    return hist[:, :, 0].tolist(), kept.tolist()


def test_history_keeps_last_k_in_order(tmp_path):
    store = RepresentationStore(tmp_path, StoreConfig(k=2, dtype="float32"), DIM)
    store.fold_window(0, window_table([1, 2, 1, 1], [10, 20, 11, 12]))
    store.fold_window(1, window_table([2], [21]))
    hist, kept = first_dim(store.view(2), [1, 2, 3])
    assert hist == [[11, 12], [20, 21], [0, 0]]  # oldest first; unknown entity: zeros, 0 kept
    assert kept == [2, 2, 0]


def test_rows_of_window_t_never_see_window_t(tmp_path):
    store = RepresentationStore(tmp_path, StoreConfig(k=4, dtype="float32"), DIM)
    store.fold_window(0, window_table([1], [1]))
    store.fold_window(1, window_table([1], [2]))
    assert store.view(1).version == 0
    assert first_dim(store.view(1), [1])[0] == [[0, 0, 0, 1]]
    assert store.view(0).version is None
    assert first_dim(store.view(0), [1])[1] == [0]
    # a reopened store reads version 0 from storage, not the live tables
    again = RepresentationStore(tmp_path, StoreConfig(k=4, dtype="float32"), DIM)
    assert first_dim(again.view(1), [1])[0] == [[0, 0, 0, 1]]
    assert first_dim(again.view(2), [1])[0] == [[0, 0, 1, 2]]


def test_a_version_is_written_once(tmp_path):
    store = RepresentationStore(tmp_path, StoreConfig(), DIM)
    store.fold_window(0, window_table([1], [1]))
    before = (tmp_path / "version=0" / "user_id.parquet").stat().st_mtime_ns
    rerun = RepresentationStore(tmp_path, StoreConfig(), DIM)
    with pytest.raises(ConfigError, match="already committed"):
        rerun.fold_window(0, window_table([1], [5]))
    assert (tmp_path / "version=0" / "user_id.parquet").stat().st_mtime_ns == before
    assert sorted(rerun.manifest()) == ["0"]


def test_store_stays_within_its_bound_evicting_the_stalest(tmp_path):
    store = RepresentationStore(tmp_path, StoreConfig(k=1, max_entities=2, dtype="float32"), DIM)
    store.fold_window(0, window_table([1, 2, 3], [1, 2, 3]))
    store.fold_window(1, window_table([3, 4], [30, 40]))
    assert store.manifest()["1"].entities == {"user_id": 2}
    hist, kept = first_dim(store.view(2), [1, 2, 3, 4])
    assert kept == [0, 0, 1, 1]
    assert hist == [[0], [0], [30], [40]]


def test_float16_shrinks_the_store_file(tmp_path):
    rng = np.random.default_rng(0)
    table = window_table(list(range(500)), [0.0] * 500)
    noise = rng.normal(size=500 * DIM).astype(np.float32)
    table = table.set_column(1, "fm_emb", pa.FixedSizeListArray.from_arrays(pa.array(noise), DIM))
    sizes = {}
    for dtype in ("float16", "float32"):
        store = RepresentationStore(tmp_path / dtype, StoreConfig(k=1, dtype=dtype), DIM)
        store.fold_window(0, table)
        sizes[dtype] = store.manifest()["0"].bytes
    assert sizes["float16"] < 0.75 * sizes["float32"]  # ids and counts are the rest


def test_bad_rows_name_the_column(tmp_path):
    store = RepresentationStore(tmp_path, StoreConfig(), DIM)
    with pytest.raises(DataError, match="fm_emb"):
        store.fold_window(0, window_table([1], [1]).drop_columns(["fm_emb"]))
    with pytest.raises(DataError, match="user_id"):
        store.fold_window(0, window_table([1], [1]).drop_columns(["user_id"]))
    assert store.manifest() == {}


def test_tower_pools_only_real_events_and_uses_the_missing_vector():
    import torch

    from exfm_ray.loopfm.features import LoopTower

    for pooling in ("mean", "last", "sum", "attention"):
        tower = LoopTower(keys=1, fm_dim=2, dim=2, pooling=pooling)
        with torch.no_grad():
            tower.proj[0].weight.copy_(torch.eye(2))
            tower.proj[0].bias.zero_()
            tower.missing.fill_(7.0)
        hist = torch.tensor([[[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0]] * 3]])  # [2, 1, 3, 2]
        out = tower(hist, torch.tensor([[2], [0]]))
        want = {"mean": [2.0, 3.0], "last": [3.0, 4.0], "sum": [4.0, 6.0], "attention": [2.0, 3.0]}[pooling]
        assert out[0, 0].tolist() == want, pooling  # the padding slot (9, 9) never counts
        assert out[1, 0].tolist() == [7.0, 7.0], pooling


def test_builder_folds_committed_augmented_windows_once_each(tmp_path):
    from exfm_ray.das.local import augment_stream_locally
    from exfm_ray.das.store import AugmentedStore
    from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
    from exfm_ray.fm.config import FMConfig
    from exfm_ray.loopfm.builder import fold_augmented

    stream = SyntheticStream(
        SyntheticConfig(num_windows=3, rows_per_window=400, num_tenants=2, num_users=40, num_ads=20)
    ).stream()
    augment_stream_locally(stream, tmp_path / "aug", FMConfig(size=1))
    augmented = AugmentedStore(tmp_path / "aug")
    dim = augmented.read_window(1, columns=["example_id", "event_time", "fm_emb"]).schema.field("fm_emb").type.list_size
    store = RepresentationStore(tmp_path / "loopfm", StoreConfig(k=2), dim)
    assert fold_augmented(augmented, store) == [0, 1, 2]
    manifest = store.manifest()
    assert manifest["0"].entities == {"user_id": 0}  # window 0: no FM yet, nothing to keep
    assert 0 < manifest["1"].entities["user_id"] <= 40 and manifest["2"].fm_versions
    assert fold_augmented(augmented, RepresentationStore(tmp_path / "loopfm", StoreConfig(k=2), dim)) == []
    # each event counts once even when two tenants logged it (the stream's overlap)
    events = {}
    for t in (1, 2):
        for r in augmented.read_window(t, columns=["example_id", "event_time", "user_id"]).to_pylist():
            events.setdefault(r["example_id"], r["user_id"][0])
    users = list(events.values())
    user = max(set(users), key=users.count)
    table = store.tables["user_id"]
    assert int(table.n[table.index[user]]) == users.count(user)
