import pyarrow as pa
import pytest

from exfm_ray.errors import ConfigError, DataError
from exfm_ray.schema import SparseFeature, StreamSpec, TenantSpec, arrow_schema, validate_table

pytestmark = pytest.mark.unit


def _spec() -> StreamSpec:
    return StreamSpec(
        name="tiny",
        sparse=[
            SparseFeature(name="user", cardinality=3),
            SparseFeature(name="tags", cardinality=4, multi_valued=True),
        ],
        dense=["price"],
        tenants=[TenantSpec(name="feed", features=["user"], dense=["price"])],
        window_starts=[0],
    )


def _table(**changes) -> pa.Table:
    data = {
        "example_id": [1, 2, 3],
        "event_time": [10, 11, 12],
        "window": [0, 0, 0],
        "tenant": ["feed", "feed", "feed"],
        "label_click": [0.0, 1.0, 0.0],
        "user": [[0], [2], [1]],
        "tags": [[0, 3], [], [1]],
        "price": [1.0, 2.0, 3.0],
    }
    data.update(changes)
    return pa.table({k: v for k, v in data.items() if v is not None})


def test_valid_table_is_cast_to_the_exact_schema():
    out = validate_table(_table(), _spec())
    assert out.schema.equals(arrow_schema(_spec()))
    assert out.column("window").type == pa.int32() and out.column("label_click").type == pa.float32()
    assert out.column("tags").to_pylist() == [[0, 3], [], [1]]


def test_missing_column_is_named():
    with pytest.raises(DataError, match="column 'price': missing column") as info:
        validate_table(_table(price=None), _spec())
    assert info.value.column == "price" and info.value.row is None


def test_id_out_of_range_names_column_and_row():
    with pytest.raises(DataError) as info:
        validate_table(_table(user=[[0], [1], [3]]), _spec())
    assert (info.value.column, info.value.row) == ("user", 2)
    assert "id 3 outside [0, 3)" in str(info.value)
    with pytest.raises(DataError) as info:
        validate_table(_table(tags=[[0], [1, 2], [-1, 0]]), _spec())
    assert (info.value.column, info.value.row) == ("tags", 2)


def test_several_ids_in_single_valued_feature():
    with pytest.raises(DataError, match="single-valued") as info:
        validate_table(_table(user=[[0], [0, 1], [1]]), _spec())
    assert info.value.row == 1


def test_non_binary_label_names_row_and_value():
    with pytest.raises(DataError, match=r"column 'label_click', row 1: label must be 0 or 1, got 2\.0"):
        validate_table(_table(label_click=[0.0, 2.0, 1.0]), _spec())


def test_missing_label_allowed_only_when_not_required():
    table = _table(label_click=pa.array([0.0, None, 1.0], pa.float32()))
    with pytest.raises(DataError, match="label missing") as info:
        validate_table(table, _spec())
    assert info.value.row == 1
    assert validate_table(table, _spec(), labels_required=False).column("label_click").null_count == 1


def test_unknown_tenant_and_null_time():
    with pytest.raises(DataError, match="unknown tenant 'ads'") as info:
        validate_table(_table(tenant=["feed", "ads", "feed"]), _spec())
    assert info.value.row == 1
    with pytest.raises(DataError, match="null value") as info:
        validate_table(_table(event_time=pa.array([1, 2, None], pa.int64())), _spec())
    assert (info.value.column, info.value.row) == ("event_time", 2)


def test_wrong_type_is_named():
    with pytest.raises(DataError, match="column 'user'"):
        validate_table(_table(user=["a", "b", "c"]), _spec())


def test_spec_rejects_reserved_and_unknown_names():
    with pytest.raises(ConfigError, match="reserved"):
        StreamSpec.parse(
            {
                "name": "x",
                "sparse": [{"name": "window", "cardinality": 2}],
                "tenants": [{"name": "t", "features": []}],
                "window_starts": [0],
            }
        )
    with pytest.raises(ConfigError, match="unknown features"):
        StreamSpec.parse(
            {
                "name": "x",
                "sparse": [{"name": "u", "cardinality": 2}],
                "tenants": [{"name": "t", "features": ["v"]}],
                "window_starts": [0],
            }
        )
    assert StreamSpec.from_json(_spec().to_json()) == _spec()
