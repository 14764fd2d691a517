"""The FM actor group on a local CPU Ray: parity, versions, failures, bad input."""

import asyncio
import time

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from actors.fm_group import FMGroupConfig
from actors.launch import start_fm_group, stop_fm_group
from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.errors import DataError, FMUnavailable
from exfm_ray.fm.config import ShardingConfig
from exfm_ray.fm.model import FMConfig, build_fm
from exfm_ray.fm.registry import FMRegistry, publish_model

pytestmark = pytest.mark.ray

FM_CFG = FMConfig(size=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    stream = SyntheticStream(
        SyntheticConfig(num_windows=2, rows_per_window=1500, num_tenants=2, num_users=200)
    ).stream()
    root = tmp_path_factory.mktemp("fm-store")
    registry = FMRegistry(root)
    models = []
    for seed in (0, 1):  # two versions with different weights
        torch.manual_seed(seed)
        fm = build_fm(stream.spec, FM_CFG).eval()
        publish_model(registry, fm, stream.spec, FM_CFG, watermark=seed, through_window=-1)
        models.append(fm)
    registry.publish(registry.get("fm-0001"))  # start from the first version
    return stream, root, models


def reference(fm, stream, table) -> tuple[np.ndarray, np.ndarray]:
    rows = WindowTensors(table, stream.spec)
    b = rows.batch(0, rows.num_rows, stream.spec.sparse_names)
    with torch.no_grad():
        out = fm(b.sparse, b.dense)
    return out.logits.numpy(), out.hidden.numpy()


@pytest.fixture(scope="module")
def group(ray_cluster, world):
    _, root, _ = world
    cfg = FMGroupConfig(
        name="fm-test",
        storage=str(root),
        num_shards=2,
        call_timeout_s=20,
        sharding=ShardingConfig(sharding_type="table_wise"),
    )
    handle = start_fm_group(cfg, detached=False)
    yield handle
    stop_fm_group("fm-test")


def test_two_rank_table_wise_group_equals_the_unsharded_fm(group, world):
    stream, _, models = world
    table = stream.windows[1].slice(0, 999)  # odd size: exercises padding across ranks
    out = ray.get(group.label.remote(table))
    logits, hidden = reference(models[0], stream, table)
    assert out.version == "fm-0001" and out.num_rows == 999
    assert out.heads == stream.spec.tenant_names
    np.testing.assert_allclose(out.logits, logits, atol=1e-5)
    np.testing.assert_allclose(out.hidden, hidden, atol=1e-5)
    status = ray.get(group.status.remote())
    assert set(status.gangs[0].plan.values()) == {"table_wise"}


def test_column_wise_group_equals_the_unsharded_fm(ray_cluster, world):
    stream, root, models = world
    cfg = FMGroupConfig(
        name="fm-cw", storage=str(root), num_shards=2, sharding=ShardingConfig(sharding_type="column_wise")
    )
    handle = start_fm_group(cfg, detached=False)
    try:
        table = stream.windows[0].slice(0, 256)
        out = ray.get(handle.label.remote(table))
        np.testing.assert_allclose(out.logits, reference(models[0], stream, table)[0], atol=1e-5)
        assert set(ray.get(handle.status.remote()).gangs[0].plan.values()) == {"column_wise"}
    finally:
        stop_fm_group("fm-cw")


def test_bad_batches_name_the_column_and_the_group_keeps_serving(group, world):
    stream, _, models = world
    good = stream.windows[1].slice(0, 32)
    ids = good.column("user_id").to_pylist()
    ids[5] = [10**6]
    out_of_range = good.set_column(
        good.schema.get_field_index("user_id"), "user_id", pa.array(ids, pa.list_(pa.int64()))
    )
    with pytest.raises(DataError, match=r"user_id.*row 5"):
        ray.get(group.label.remote(out_of_range))
    with pytest.raises(DataError, match="ad_id.*missing"):
        ray.get(group.label.remote(good.drop(["ad_id"])))
    wrong = good.set_column(good.schema.get_field_index("device"), "device", pa.array(["x"] * 32))
    with pytest.raises(DataError, match="device"):
        ray.get(group.label.remote(wrong))
    assert ray.get(group.label.remote(good.slice(0, 0))).num_rows == 0
    out = ray.get(group.label.remote(good))
    np.testing.assert_allclose(out.logits, reference(models[0], stream, good)[0], atol=1e-5)


def test_version_switch_under_load_fails_no_call(group, world):
    stream, _, models = world
    table = stream.windows[1].slice(0, 128)
    expected = {f"fm-000{i + 1}": reference(m, stream, table)[0] for i, m in enumerate(models)}

    async def load():
        before = [group.label.remote(table) for _ in range(6)]
        switch = group.switch.remote("fm-0002")
        during = [group.label.remote(table) for _ in range(6)]
        await switch
        after = [group.label.remote(table) for _ in range(4)]
        return await asyncio.gather(*before, *during, *after)

    answers = asyncio.run(load())
    assert len(answers) == 16  # none raised
    for a in answers:
        np.testing.assert_allclose(a.logits, expected[a.version], atol=1e-5)  # each answer matches its version
    assert all(a.version == "fm-0002" for a in answers[-4:])
    assert answers[0].version == "fm-0001"


def test_killing_a_rank_rebuilds_the_gang_and_answers_stay_the_same(group, world):
    stream, _, _ = world
    table = stream.windows[0].slice(0, 200)
    before = ray.get(group.label.remote(table))
    ranks = ray.get(group.rank_handles.remote())
    ray.kill(ranks[1], no_restart=True)
    saw_unavailable, deadline = False, time.time() + 180
    while True:
        start = time.time()
        try:
            after = ray.get(group.label.remote(table))
            break
        except FMUnavailable:
            saw_unavailable = True
            assert time.time() - start < 30, "a failed call must fail fast, not hang"
            assert time.time() < deadline, ray.get(group.status.remote())
            time.sleep(1)
    assert saw_unavailable
    assert after.version == before.version
    np.testing.assert_allclose(after.logits, before.logits, atol=1e-6)
    gang = ray.get(group.status.remote()).gangs[0]
    assert gang.status == "ready" and gang.rebuilds == 1
