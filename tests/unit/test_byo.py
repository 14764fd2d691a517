"""Bring-your-own logs (`exfm experiment --data LOG --mapping YAML`) and the SourceConfig that picks a
stream: loading, formats, and errors that name the column and row."""

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exfm_ray.data.byo import MappingConfig, load_byo
from exfm_ray.data.sources import SourceConfig, load_stream
from exfm_ray.data.synthetic import SyntheticConfig
from exfm_ray.errors import ConfigError, DataError
from tests.stream_helpers import all_rows, value_counts

pytestmark = pytest.mark.unit


# --- Bring your own ----------------------------------------------------------------------------

CSV = """\
uid,ad,tags,price,click,ts,site
u1,a1,x|y,1.5,1,1700000300,s1
u2,a2,,2.0,0,1700000100,s1
u1,a3,y,,1,1700000200,s2
u3,a1,z|x|,0.5,0,1700000400,s3
u2,a2,x,3,,1700000500,s1
u4,,y,1,0,1700000600,s2
u1,a1,x,2,1,,s1
u5,a4,y,4,0,1700000700,s1
u5,a4,y,4,1,1700000800,
"""

BASE = {
    "label": "click",
    "time": "ts",
    "tenant": "site",
    "categorical": ["uid", "ad", "tags"],
    "multi_valued": {"tags": "|"},
    "dense": ["price"],
    "windows": 2,
}


def _mapping(**changes) -> MappingConfig:
    return MappingConfig.parse({**BASE, **changes})


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_byo_csv_loads_and_counts_excluded(tmp_path):
    s = load_byo(_write(tmp_path, CSV), _mapping())
    assert s.report.rows_read == 9
    assert s.report.excluded == {"label missing": 1, "time missing": 1, "tenant missing": 1}
    assert s.num_rows == 6
    table = all_rows(s)
    # Sorted by time: rows 1, 2, 0, 3, 5, 7 of the file; example_id = row number.
    assert table.column("example_id").to_pylist() == [1, 2, 0, 3, 5, 7]
    assert table.column("event_time").to_pylist() == [
        1700000100,
        1700000200,
        1700000300,
        1700000400,
        1700000600,
        1700000700,
    ]
    assert [w.num_rows for w in s.windows] == [3, 3]
    assert s.spec.window_starts == [1700000100, 1700000400]
    assert table.column("label_click").to_pylist() == [0, 1, 1, 0, 0, 0]
    # Sorted vocabulary over the kept rows: u1..u5 -> 0..4.
    assert table.column("uid").to_pylist() == [[1], [0], [0], [2], [3], [4]]
    assert table.column("ad").to_pylist() == [[1], [2], [0], [0], [], [3]]  # missing ad -> empty list
    assert table.column("tags").to_pylist() == [[], [1], [0, 1], [2, 0], [1], [1]]
    assert s.spec.feature("tags").multi_valued and s.spec.feature("tags").cardinality == 3
    assert table.column("price").to_pylist() == [2.0, 0.0, 1.5, 0.5, 1.0, 4.0]
    assert "price 1" in s.spec.description  # one missing price filled with 0.0
    assert s.spec.tenant_names == ["s1", "s2", "s3"]
    assert table.column("tenant").to_pylist() == ["s1", "s2", "s1", "s3", "s2", "s1"]
    assert s.spec.tenant("s1").features == ["uid", "ad", "tags"] and s.spec.tenant("s1").dense == ["price"]


def test_byo_gzip_and_parquet_match_csv(tmp_path):
    plain = all_rows(load_byo(_write(tmp_path, CSV), _mapping()))
    gz = all_rows(load_byo(_write(tmp_path, CSV, "data.csv.gz"), _mapping()))
    tsv = all_rows(load_byo(_write(tmp_path, CSV.replace(",", "\t"), "data.tsv"), _mapping()))
    assert gz.equals(plain) and tsv.equals(plain)
    typed = pa.table(
        {
            "uid": ["u1", "u2", "u1", "u3"],
            "ad": [10, 20, None, 10],
            "tags": ["x|y", None, "y", "x"],
            "price": [1.5, None, 2.0, float("nan")],
            "click": [1, 0, None, 1],
            "ts": [30, 10, 20, 40],
            "site": ["s1", "s2", "s1", "s2"],
        }
    )
    pq.write_table(typed, tmp_path / "data.parquet")
    s = load_byo(tmp_path / "data.parquet", _mapping())
    t = all_rows(s)
    assert s.report.excluded == {"label missing": 1}
    assert t.column("example_id").to_pylist() == [1, 0, 3]
    assert t.column("ad").to_pylist() == [[1], [0], [0]]  # ints compared as strings "10" < "20"
    assert t.column("price").to_pylist() == [0.0, 1.5, 0.0]
    (tmp_path / "data.parquet.gz").write_bytes(gzip.compress((tmp_path / "data.parquet").read_bytes()))
    assert all_rows(load_byo(tmp_path / "data.parquet.gz", _mapping())).equals(t)


def test_byo_parquet_timestamps_and_list_columns(tmp_path):
    typed = pa.table(
        {
            "click": [True, False, True],
            "at": pa.array([2_500, 1_000, 3_000], pa.timestamp("ms", tz="UTC")),
            "tags": [["b", "a"], [], None],
            "kind": pa.array(["x", "y", "x"]).dictionary_encode(),
        }
    )
    pq.write_table(typed, tmp_path / "typed.pq")
    m = MappingConfig.parse({"label": "click", "time": "at", "tenant": "kind", "categorical": ["tags"], "windows": 1})
    s = load_byo(tmp_path / "typed.pq", m)
    t = all_rows(s)
    assert t.column("event_time").to_pylist() == [1, 2, 3]  # ms floored to seconds
    assert t.column("label_click").to_pylist() == [0.0, 1.0, 1.0]
    assert t.column("tags").to_pylist() == [[], [1, 0], []]
    assert s.spec.feature("tags").multi_valued and s.spec.tenant_names == ["x", "y"]


def test_byo_time_strings_and_format(tmp_path):
    text = "click,when,u\n1,2024-01-02 10:00:00,a\n0,2024-01-01 09:00:00,b\n1,2024-01-03 00:00:00,a\n"
    s = load_byo(
        _write(tmp_path, text),
        MappingConfig.parse({"label": "click", "time": "when", "categorical": ["u"], "windows": 3}),
    )
    assert all_rows(s).column("event_time").to_pylist() == [1704099600, 1704189600, 1704240000]
    text = "click,hour,u\n1,24010210,a\n0,24010109,b\n"
    m = MappingConfig.parse(
        {"label": "click", "time": "hour", "time_format": "%y%m%d%H", "categorical": ["u"], "windows": 1}
    )
    assert all_rows(load_byo(_write(tmp_path, text), m)).column("event_time").to_pylist() == [1704099600, 1704189600]


def test_byo_no_time_no_tenant_and_id(tmp_path):
    text = "click,u,eid\n1,a,100\n0,b,7\n1,a,55\n0,c,9\n"
    m = MappingConfig.parse({"label": "click", "categorical": ["u"], "id": "eid", "windows": 2})
    s = load_byo(_write(tmp_path, text), m)
    t = all_rows(s)
    assert t.column("event_time").to_pylist() == [0, 1, 2, 3]
    assert t.column("example_id").to_pylist() == [100, 7, 55, 9]
    assert s.spec.tenant_names == ["all"] and s.spec.window_starts == [0, 2]


def test_byo_max_tenants_folds_into_other(tmp_path):
    rows = ["click,u,site"] + [f"{i % 2},u{i},{site}" for i, site in enumerate("aaaabbbccd")]
    mapping = {"label": "click", "tenant": "site", "max_tenants": 3, "categorical": ["u", "site"], "windows": 2}
    s = load_byo(_write(tmp_path, "\n".join(rows) + "\n"), MappingConfig.parse(mapping))
    t = all_rows(s)
    assert s.spec.tenant_names == ["a", "b", "other"]
    counts = value_counts(t.column("tenant"))
    assert counts == {"a": 4, "b": 3, "other": 3}
    assert s.spec.feature("site").cardinality == 4  # the feature keeps every site


def test_byo_reserved_names_renamed(tmp_path):
    text = "click,window,tenant,x\n1,3,t,0.5\n0,4,t,1\n"
    m = MappingConfig.parse({"label": "click", "categorical": ["window", "tenant"], "dense": ["x"], "windows": 1})
    s = load_byo(_write(tmp_path, text), m)
    assert s.spec.sparse_names == ["f_window", "f_tenant"]
    assert s.spec.tenant("all").features == ["f_window", "f_tenant"]
    assert all_rows(s).column("f_window").to_pylist() == [[0], [1]]


@pytest.mark.parametrize(
    ("text", "changes", "column", "row", "words"),
    [
        (CSV, {"dense": ["cost"]}, "cost", None, "available columns"),
        (CSV.replace("u2,a2,,2.0,0,", "u2,a2,,2.0,2,"), {}, "click", 1, "0 or 1"),
        (CSV.replace("u2,a2,,2.0,0,", "u2,a2,,2.0,yes,"), {}, "click", 1, "'yes'"),
        (CSV.replace("1700000200", "tuesday"), {}, "ts", 2, "'tuesday'"),
        (CSV.replace(",0.5,", ",cheap,"), {}, "price", 3, "'cheap'"),
        (CSV.replace("u3,a1,z|x|,0.5,0,1700000400,s3", "u3,a1,z|x|,0.5,0,1700000400x,s3"), {}, "ts", 3, "parse"),
        ("click,u,eid\n1,a,3\n0,b,x\n", {"id": "eid", "categorical": ["u"], "time": None, "tenant": None,
                                         "dense": [], "multi_valued": {}}, "eid", 1, "integer"),
    ],
)  # fmt: skip
def test_byo_data_errors_name_column_and_row(tmp_path, text, changes, column, row, words):
    with pytest.raises(DataError) as info:
        load_byo(_write(tmp_path, text), _mapping(**changes))
    err = info.value
    assert err.column == column and err.row == row
    assert f"column {column!r}" in str(err) and words in str(err)
    if row is not None:
        assert f"row {row}" in str(err)


def test_byo_time_format_mismatch(tmp_path):
    text = "click,hour,u\n1,24010210,a\n0,2401-01,b\n"
    m = MappingConfig.parse({"label": "click", "time": "hour", "time_format": "%y%m%d%H", "categorical": ["u"]})
    with pytest.raises(DataError, match=r"column 'hour', row 1: .*'2401-01'.*%y%m%d%H"):
        load_byo(_write(tmp_path, text), m)


def test_byo_too_many_windows(tmp_path):
    with pytest.raises(DataError, match=r"windows: 7.*6 rows kept.*label missing"):
        load_byo(_write(tmp_path, CSV), _mapping(windows=7))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"colour": "red"}, "colour"),
        ({"drop": ["ad"]}, "'ad' is listed in both drop and categorical"),
        ({"dense": ["uid"]}, "'uid' is listed in both categorical and dense"),
        ({"categorical": ["uid", "click"]}, "label column 'click'"),
        ({"multi_valued": {"nope": "|"}}, "'nope'"),
        ({"student_features": ["uid", "zzz"]}, "zzz"),
        ({"time": None, "time_format": "%Y"}, "time_format"),
        ({"tenant": None, "max_tenants": 3}, "max_tenants"),
        ({"max_tenants": 1}, "max_tenants"),
        ({"windows": 0}, "windows"),
        ({"categorical": ["window", "f_window"], "multi_valued": {}}, "'f_window'"),
    ],
)
def test_byo_mapping_errors(changes, words):
    with pytest.raises(ConfigError, match=words):
        _mapping(**changes)


def test_byo_mapping_from_yaml(tmp_path):
    (tmp_path / "m.yaml").write_text("label: click\ncategorical: [uid]\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_byo(_write(tmp_path, CSV), tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text("label: click\ncategorical: [uid, ad]\nstudent_features: [ad]\nwindows: 3\n")
    s = load_byo(_write(tmp_path, CSV), tmp_path / "m.yaml")
    assert s.report.excluded == {"label missing": 1}
    assert s.spec.tenant("all").features == ["ad"] and s.num_rows == 8


# --- SourceConfig ------------------------------------------------------------------------------


def test_source_config_dispatch(tmp_path, data_dir):
    small = SyntheticConfig(num_windows=2, rows_per_window=200, num_users=50, num_ads=20)
    assert load_stream(SourceConfig(synthetic=small)).spec.name == "synthetic"
    assert (
        load_stream(
            SourceConfig.parse({"dataset": "frappe", "data_dir": str(data_dir), "num_windows": 4})
        ).spec.num_windows
        == 4
    )
    with pytest.raises(ConfigError, match="data_dir"):
        load_stream(SourceConfig(dataset="movielens"))
    with pytest.raises(ConfigError, match="frappe"):
        load_stream(SourceConfig(dataset="frappe", data_dir=tmp_path))
    with pytest.raises(ConfigError, match="mapping_path"):
        load_stream(SourceConfig(dataset="byo", data_path=_write(tmp_path, CSV)))
    (tmp_path / "m.yaml").write_text("label: click\ncategorical: [uid]\nwindows: 2\n")
    byo = SourceConfig(dataset="byo", data_path=tmp_path / "data.csv", mapping_path=tmp_path / "m.yaml")
    assert load_stream(byo).num_rows == 8
    with pytest.raises(ConfigError, match="dataset"):
        SourceConfig.parse({"dataset": "imagenet"})
