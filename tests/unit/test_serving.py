"""Serving without Ray: row validation and encoding, request models, ServeConfig, the HTTP API on the
in-process reference predictor, and the Serve config file."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from exfm_ray.errors import ConfigError
from exfm_ray.schema import SparseFeature
from exfm_ray.serving.config import ServeConfig
from exfm_ray.serving.demo import publish_synthetic_students
from exfm_ray.serving.direct import build_direct_api
from exfm_ray.serving.rows import RowError, RowSpec, encode_rows, to_batch
from exfm_ray.serving.schema import PredictRequest
from exfm_ray.students.config import StudentConfig
from exfm_ray.students.meta import StudentMeta
from exfm_ray.students.store import StudentStore
from tests.serving_helpers import expected_probabilities, published_model, rows_for

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    publish_synthetic_students(root, num_tenants=2)
    return StudentStore(root)


@pytest.fixture
def spec():
    meta = StudentMeta(
        tenant="t",
        version="v1",
        window=0,
        features=[
            SparseFeature(name="user", cardinality=10),
            SparseFeature(name="tags", cardinality=5, multi_valued=True),
        ],
        dense=["bid"],
        student=StudentConfig(),
    )
    return RowSpec.from_meta(meta)


def _rows(*rows):
    return PredictRequest.model_validate({"rows": list(rows)}).rows


def _row(user=(1,), tags=(0, 2), bid=0.5, **extra):
    row = {"sparse": {"user": list(user), "tags": list(tags)}, "dense": {"bid": bid}}
    row.update(extra)
    return row


def test_encoded_rows_give_the_students_own_probabilities(store):
    for tenant in store.tenants():
        model, meta = published_model(store, tenant)
        rows = rows_for(store, tenant, 7)
        spec = RowSpec.from_meta(meta)
        first, second = encode_rows(_rows(*rows[:3]), spec, 10), encode_rows(_rows(*rows[3:]), spec, 10)
        sparse, dense = to_batch([first, second], spec)
        with torch.inference_mode():
            got = model(sparse, dense).tolist()
        assert got == pytest.approx(expected_probabilities(model, meta, rows), abs=1e-6)


def test_multi_valued_ids_keep_their_lengths(spec):
    encoded = encode_rows(_rows(_row(tags=(0, 2, 4)), _row(tags=())), spec, 10)
    sparse, dense = to_batch([encoded], spec)
    assert sparse.keys() == ["user", "tags"]
    assert sparse.lengths().tolist() == [1, 1, 3, 0]
    assert sparse.values().tolist() == [1, 1, 0, 2, 4]
    assert dense.shape == (2, 1)


@pytest.mark.parametrize(
    "row, loc, message",
    [
        ({"sparse": {"user": [1]}, "dense": {"bid": 0.5}}, ["body", "rows", 1, "sparse", "tags"], "missing feature"),
        (_row(user=(10,)), ["body", "rows", 1, "sparse", "user"], "id 10 outside [0, 10)"),
        (_row(user=(-1,)), ["body", "rows", 1, "sparse", "user"], "id -1 outside"),
        (_row(user=(1, 2)), ["body", "rows", 1, "sparse", "user"], "several ids"),
        (_row() | {"sparse": {"user": [1], "tags": [], "ad": [3]}}, ["body", "rows", 1, "sparse", "ad"],
         "unknown feature"),
        (_row() | {"dense": {}}, ["body", "rows", 1, "dense", "bid"], "missing dense"),
        (_row() | {"dense": {"bid": 1.0, "price": 2.0}}, ["body", "rows", 1, "dense", "price"], "unknown dense"),
    ],
)  # fmt: skip
def test_rows_that_do_not_fit_the_student_name_field_and_row(spec, row, loc, message):
    with pytest.raises(RowError) as err:
        encode_rows(_rows(_row(), row), spec, 10)
    (issue,) = err.value.detail()
    assert issue["loc"] == loc and message in issue["msg"]
    assert "rows[1]" in str(err.value)


def test_oversized_request_is_refused_and_issues_are_capped(spec):
    with pytest.raises(RowError, match="3 rows; at most 2"):
        encode_rows(_rows(_row(), _row(), _row()), spec, 2)
    with pytest.raises(RowError) as err:
        encode_rows(_rows(*[_row(user=(99,))] * 50), spec, 100)
    assert len(err.value.issues) == 10


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"rows": []}, ["rows"]),
        ({"rows": [_row(user=("7",))]}, ["rows", 0, "sparse", "user", 0]),
        ({"rows": [_row(user=(1.5,))]}, ["rows", 0, "sparse", "user", 0]),
        ({"rows": [_row(user=(True,))]}, ["rows", 0, "sparse", "user", 0]),
        ({"rows": [_row(bid=float("nan"))]}, ["rows", 0, "dense", "bid"]),
        ({"rows": [_row(bid=float("inf"))]}, ["rows", 0, "dense", "bid"]),
        ({"rows": [_row(bid="high")]}, ["rows", 0, "dense", "bid"]),
        ({"rows": [_row(extra=1)]}, ["rows", 0, "extra"]),
        ({"rows": [{"dense": {"bid": 1.0}}]}, ["rows", 0, "sparse"]),
    ],
)
def test_request_model_refuses_wrong_types_nan_and_empty_lists(body, loc):
    with pytest.raises(ValidationError) as err:
        PredictRequest.model_validate(body)
    assert [list(e["loc"]) for e in err.value.errors()][0] == loc


def test_serve_config_defaults_to_loopback_and_checks_fields():
    cfg = ServeConfig(store_root=Path("s"))
    assert cfg.host == "127.0.0.1" and cfg.url == "http://127.0.0.1:8000"
    assert all(f.description for f in ServeConfig.model_fields.values())
    with pytest.raises(ConfigError, match="max_rows_per_request"):
        ServeConfig.parse({"store_root": "s", "max_rows_per_request": 2000, "max_batch_rows": 1000})
    with pytest.raises(ConfigError, match="max_replicas"):
        ServeConfig.parse({"store_root": "s", "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="wizard"):
        ServeConfig.parse({"store_root": "s", "wizard": 1})


def test_reference_api_answers_codes_and_docs(store):
    client = TestClient(build_direct_api(ServeConfig(store_root=store.root.parent, max_rows_per_request=4)))
    tenant = store.tenants()[0]
    model, meta = published_model(store, tenant)
    rows = rows_for(store, tenant, 3)
    reply = client.post(f"/v1/tenants/{tenant}/predict", json={"rows": rows})
    assert reply.status_code == 200
    body = reply.json()
    assert body["tenant"] == tenant and body["version"] == store.latest(tenant).version
    assert body["probabilities"] == pytest.approx(expected_probabilities(model, meta, rows), abs=1e-5)

    assert client.post("/v1/tenants/nobody/predict", json={"rows": rows}).status_code == 404
    assert client.post("/v1/tenants/..%2F..%2Fetc/predict", json={"rows": rows}).status_code in (404, 422)
    too_many = client.post(f"/v1/tenants/{tenant}/predict", json={"rows": rows_for(store, tenant, 5)})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "rows"]
    nan = client.post(
        f"/v1/tenants/{tenant}/predict",
        content=json.dumps({"rows": [rows[0] | {"dense": {meta.dense[0]: math.nan}}]}),
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 422 and nan.json()["detail"][0]["loc"][:3] == ["body", "rows", 0]
    listed = client.get("/v1/tenants").json()["tenants"]
    assert {t["tenant"]: t["version"] for t in listed} == {t: store.latest(t).version for t in store.tenants()}
    assert client.get("/v1/health").json()["status"] == "ok"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/tenants/{tenant}/predict", "/v1/tenants", "/v1/health"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_serve_config_file_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    from exfm_ray.serving.app import app_builder

    data = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    app = ServeDeploySchema.model_validate(data).applications[0]
    assert app.import_path == "exfm_ray.serving.app:app_builder"
    assert app_builder(app.args) is not None  # args validate into a ServeConfig; nothing starts
    with pytest.raises(ConfigError, match="port"):
        app_builder({**app.args, "port": 0})
