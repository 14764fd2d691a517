import numpy as np
import pyarrow as pa
import pytest
import torch

from exfm_ray.das.columns import FM_EMB, FM_VERSION, attach, first_occurrence, label_table
from exfm_ray.das.local import LocalLabeler, augment_table
from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.model import FMConfig, build_fm
from exfm_ray.fm.registry import FMVersion

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def world():
    stream = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=600, num_tenants=3, overlap=0.3)).stream()
    torch.manual_seed(0)
    cfg = FMConfig(size=1)
    fm = build_fm(stream.spec, cfg)
    version = FMVersion(
        version="fm-0001", path="/nowhere", watermark=stream.spec.window_starts[1] - 1, through_window=0,
        spec=stream.spec, fm=cfg,
    )  # fmt: skip
    return stream, LocalLabeler(fm, version), fm


def test_first_occurrence_marks_one_row_per_example():
    assert first_occurrence(np.array([5, 3, 5, 7, 3])).tolist() == [True, True, False, True, False]


def test_augment_labels_each_example_once_and_every_row_gets_its_own_head(world):
    stream, labeler, fm = world
    table = stream.windows[1]
    calls = []

    class Counting:
        def label(self, t):
            calls.append(t.num_rows)
            return labeler.label(t)

    out = augment_table(table, Counting(), stream.spec, fm.hidden_dim)
    unique = len(np.unique(table.column("example_id").to_numpy()))
    assert calls == [unique] and unique < table.num_rows  # overlap exists and was labeled once
    assert out.num_rows == table.num_rows
    assert out.column("example_id").to_pylist() == table.column("example_id").to_pylist()
    rows = WindowTensors(table, stream.spec)
    with torch.no_grad():
        logits = fm(*(lambda b: (b.sparse, b.dense))(rows.batch(0, rows.num_rows, stream.spec.sparse_names))).logits
    own = logits.gather(1, rows.tenant.unsqueeze(1)).squeeze(1).numpy()
    np.testing.assert_allclose(out.column("fm_logit").to_numpy(), own, atol=1e-5)
    np.testing.assert_allclose(out.column("fm_logit_feed").to_numpy(), logits[:, 0].numpy(), atol=1e-5)
    assert out.column("fm_mask").to_pylist() == [True] * table.num_rows
    assert out.schema.field(FM_EMB).type == pa.list_(pa.float32(), fm.hidden_dim)
    assert set(out.column(FM_VERSION).to_pylist()) == {"fm-0001"}


def test_missing_fm_output_gives_nulls_and_mask_off_never_drops(world):
    stream, _, fm = world
    table = stream.windows[1].slice(0, 50)
    labels = label_table(table.column("example_id"), None, stream.spec.tenant_names, fm.hidden_dim, now=0)
    out = attach(table, labels, stream.spec)
    assert out.num_rows == 50 and out.column("fm_mask").to_pylist() == [False] * 50
    assert out.column("fm_logit").null_count == 50


def test_leakage_guard_masks_rows_older_than_the_watermark(world):
    stream, labeler, fm = world
    table = stream.windows[1].slice(0, 40)
    labels = label_table(table.column("example_id"), labeler.label(table), stream.spec.tenant_names, fm.hidden_dim, 0)
    times = table.column("event_time").to_numpy()
    cut = int(np.median(times))
    labels = labels.set_column(
        labels.schema.get_field_index("fm_data_watermark"), "fm_data_watermark", pa.array(np.full(40, cut))
    )
    out = attach(table, labels, stream.spec)
    assert out.column("fm_mask").to_pylist() == (times > cut).tolist()


def test_window_batches_hold_every_row_of_their_examples_once(world):
    from exfm_ray.das.units import example_batches

    stream, _, _ = world
    window = stream.windows[1]
    batches = example_batches(window, 50)
    ids = [b.column("example_id").to_numpy() for b in batches]
    assert all(len(np.unique(i)) <= 50 for i in ids) and len(batches) > 1
    owner = {}
    for k, batch_ids in enumerate(ids):
        for e in batch_ids:
            assert owner.setdefault(e, k) == k  # an example never spans two batches
    key = [("example_id", "ascending"), ("tenant", "ascending")]
    assert pa.concat_tables(batches).sort_by(key).equals(window.sort_by(key))


def test_augmented_parquet_skips_dictionary_and_statistics_where_useless(world, tmp_path):
    import pyarrow.parquet as pq

    from exfm_ray.das.store import parquet_options

    stream, labeler, fm = world
    table = stream.windows[1].slice(0, 200)
    out = augment_table(table, labeler, stream.spec, fm.hidden_dim)
    pq.write_table(out, tmp_path / "x.parquet", **parquet_options(out.schema))
    meta = pq.ParquetFile(tmp_path / "x.parquet").metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" in cols["user_id.list.element"].encodings and cols["user_id.list.element"].is_stats_set
    assert "RLE_DICTIONARY" not in cols["fm_emb.list.element"].encodings
    assert not cols["fm_emb.list.element"].is_stats_set and cols["event_time"].is_stats_set
    assert pq.read_table(tmp_path / "x.parquet").equals(out)


def test_the_ray_data_udfs_import_without_torch():
    """Every Ray Data worker imports these, and `ray.get_actor` of the FM group imports its class's
    module (actors.fm_group) in the worker: torch/torchrec would add seconds per fresh worker."""
    import subprocess
    import sys

    code = (
        "import sys, exfm_ray.das.transforms, exfm_ray.das.worker, exfm_ray.das.store, actors.fm_group; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
