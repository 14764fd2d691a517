import numpy as np
import pyarrow.compute as pc
import pytest

from exfm_ray.data.byo import load_byo
from exfm_ray.data.frappe import frappe_stream
from exfm_ray.data.movielens import movielens_stream
from exfm_ray.errors import ConfigError
from tests.stream_helpers import EXAMPLES, all_rows, value_counts

pytestmark = pytest.mark.unit


def _ids_in_range(stream) -> int:
    """Count of ids outside [0, cardinality) over every sparse feature (build_stream already checks)."""
    table = all_rows(stream)
    bad = 0
    for f in stream.spec.sparse:
        vals = pc.list_flatten(table.column(f.name)).to_numpy()
        bad += int(((vals < 0) | (vals >= f.cardinality)).sum())
    return bad


def _check_windows(stream) -> None:
    assert all(w.num_rows > 0 for w in stream.windows)
    times = all_rows(stream).column("event_time").to_numpy()
    assert (np.diff(times) >= 0).all()
    for t, w in enumerate(stream.windows):
        assert set(w.column("window").to_pylist()) == {t}
        assert w.column("event_time")[0].as_py() >= stream.spec.window_starts[t]
        if t + 1 < stream.spec.num_windows:
            assert w.column("event_time")[-1].as_py() <= stream.spec.window_starts[t + 1]


# --- MovieLens ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def movielens(data_dir):
    return movielens_stream(data_dir)


def test_movielens_rows_labels_windows(movielens):
    s = movielens
    assert s.report.rows_read == 100_000 and s.report.excluded == {}
    assert s.num_rows == 100_000
    table = all_rows(s)
    assert abs(pc.mean(table.column("label_click")).as_py() - 0.5537) <= 0.001
    assert s.spec.name == "movielens" and s.spec.num_windows == 31
    assert np.all(np.diff(s.spec.window_starts) == 7 * 86_400)
    assert s.spec.window_starts[0] == 874_713_600  # 1997-09-20 00:00 UTC, the first rating's day
    assert min(w.num_rows for w in s.windows) == 1_150
    _check_windows(s)
    # example_id is the row's position in the raw file: a permutation of 0..99,999.
    assert np.array_equal(np.sort(table.column("example_id").to_numpy()), np.arange(100_000))


def test_movielens_tenants_and_features(movielens):
    s = movielens
    table = all_rows(s)
    counts = value_counts(table.column("tenant"))
    assert counts == {"student": 21_957, "technical": 21_540, "academic": 20_251, "other": 36_252}
    assert sum(counts.values()) == s.num_rows
    assert s.spec.tenant_names == ["student", "technical", "academic", "other"]
    card = {f.name: f.cardinality for f in s.spec.sparse}
    assert card["user_id"] == 943 and card["item_id"] == 1682 and card["age_bucket"] == 7
    assert card["gender"] == 2 and card["occupation"] == 21 and card["genres"] == 19
    assert _ids_in_range(s) == 0
    assert s.spec.feature("genres").multi_valued
    genre_lengths = pc.list_value_length(table.column("genres")).to_numpy()
    assert genre_lengths.min() >= 1 and genre_lengths.max() >= 3
    assert set(s.spec.tenant("student").features) == {"user_id", "item_id", "genres", "age_bucket", "gender"}
    assert "occupation" in s.spec.description and "7 days" in s.spec.description


def test_movielens_row_matches_raw_file(movielens, data_dir):
    # Raw row 0 of ml-100k.inter: user 196, item 242, rating 3 -> label 0; item 242 is "Kolya" (Comedy).
    table = all_rows(movielens)
    row = table.filter(pc.equal(table.column("example_id"), 0)).to_pylist()[0]
    assert row["event_time"] == 881_250_949 and row["label_click"] == 0.0
    assert row["user_id"] == [195] and row["item_id"] == [241]
    assert len(row["genres"]) == 1


def test_movielens_fewer_tenants(data_dir):
    s = movielens_stream(data_dir, num_tenants=2)
    assert s.spec.tenant_names == ["student", "other"]
    assert movielens_stream(data_dir, num_tenants=1).spec.tenant_names == ["all"]
    with pytest.raises(ConfigError, match="num_tenants"):
        movielens_stream(data_dir, num_tenants=7)


# --- Frappe ------------------------------------------------------------------------------------


def test_frappe(data_dir):
    s = frappe_stream(data_dir)
    assert s.num_rows == 86_582 and s.report.excluded == {}
    table = all_rows(s)
    assert abs(pc.mean(table.column("label_click")).as_py() - 0.3303) <= 0.001
    assert s.spec.num_windows == 10
    sizes = [w.num_rows for w in s.windows]
    assert min(sizes) == 8_658 and max(sizes) == 8_659
    _check_windows(s)
    assert np.array_equal(table.column("event_time").to_numpy(), np.arange(86_582))
    assert np.array_equal(table.column("example_id").to_numpy(), np.arange(86_582))
    counts = value_counts(table.column("tenant"))
    assert counts == {"homework_0": 68_088, "homework_1": 14_172, "homework_2": 4_322}
    card = {f.name: f.cardinality for f in s.spec.sparse}
    assert card == {
        "user": 957, "item": 4082, "daytime": 7, "weekday": 7, "isweekend": 2,
        "homework": 3, "cost": 2, "weather": 9, "country": 80, "city": 233,
    }  # fmt: skip
    assert _ids_in_range(s) == 0
    # Validation rows come first: 19,063 of the first 57,722 are positive.
    assert int(pc.sum(table.column("label_click").slice(0, 57_722)).as_py()) == 19_063
    assert "pseudo-time" in s.spec.description


def test_avazu_fixture(data_dir):
    s = load_byo(data_dir / "format_fixtures" / "avazu_sample_deepctr.txt", EXAMPLES / "avazu.yaml")
    t = all_rows(s)
    assert s.num_rows == 100 and s.report.excluded == {}
    assert pc.mean(t.column("label_click")).as_py() == pytest.approx(0.20)
    assert set(t.column("event_time").to_pylist()) == {1_413_849_600}  # 2014-10-21 00:00 UTC
    assert s.spec.tenant_names == ["28905ebd", "50e219e0", "f028772b", "other"]
    counts = value_counts(t.column("tenant"))
    assert counts == {"28905ebd": 42, "50e219e0": 24, "f028772b": 20, "other": 14}
    assert s.spec.feature("site_id").cardinality == 22 and len(s.spec.sparse) == 21
    assert _ids_in_range(s) == 0


def test_criteo_fixture(data_dir):
    s = load_byo(data_dir / "format_fixtures" / "criteo_sample_deepctr.txt", EXAMPLES / "criteo.yaml")
    t = all_rows(s)
    assert s.num_rows == 200 and s.report.excluded == {}
    assert int(pc.sum(t.column("label_click")).as_py()) == 49
    assert len(s.spec.sparse) == 26 and s.spec.dense == [f"I{i}" for i in range(1, 14)]
    assert t.column("I3")[0].as_py() == 260.0 and t.column("I1")[0].as_py() == 0.0  # empty -> 0.0
    # Empty hashed categoricals give empty id lists: C22 is empty on 159 of 200 rows.
    assert int((pc.list_value_length(t.column("C22")).to_numpy() == 0).sum()) == 159
    assert t.column("example_id").to_pylist() == list(range(200))
    assert _ids_in_range(s) == 0
