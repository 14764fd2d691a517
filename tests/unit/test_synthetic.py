import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream, synthetic_stream

pytestmark = pytest.mark.unit

SMALL = {"num_windows": 3, "rows_per_window": 4000}


def _primary_rows(table: pa.Table) -> pa.Table:
    """One row per example (the first, i.e. the primary tenant's), so overlap does not double-count."""
    ids = table.column("example_id").to_numpy()
    _, first = np.unique(ids, return_index=True)
    return table.take(pa.array(np.sort(first)))


@pytest.mark.parametrize("rate", [0.02, 0.1])
def test_positive_rate_matches_target(rate):
    stream = synthetic_stream(SyntheticConfig(positive_rate=rate, **SMALL))
    table = _primary_rows(pa.concat_tables(stream.windows))
    assert table.num_rows == 3 * 4000
    assert abs(pc.mean(table.column("label_click")).as_py() - rate) <= 0.02
    for name in stream.spec.tenant_names:
        rows = table.filter(pc.equal(table.column("tenant"), name))
        if rows.num_rows >= 2000:  # the smallest tenant is too noisy for a per-tenant check
            assert abs(pc.mean(rows.column("label_click")).as_py() - rate) <= 0.02


def test_same_seed_same_stream_other_seed_differs():
    cfg = SyntheticConfig(num_windows=2, rows_per_window=1000, seed=7)
    a, b = synthetic_stream(cfg), synthetic_stream(cfg)
    assert all(x.equals(y) for x, y in zip(a.windows, b.windows, strict=True))
    assert a.spec == b.spec
    c = synthetic_stream(cfg.replace(seed=8))
    assert not c.windows[0].equals(a.windows[0])


def test_drift_rotates_user_factors():
    still = SyntheticStream(SyntheticConfig(drift=0.0, rows_per_window=200, num_users=100))
    assert np.array_equal(still.user_factors(0), still.user_factors(5))
    moving = SyntheticStream(SyntheticConfig(drift=0.3, rows_per_window=200, num_users=100))
    u0, u1 = moving.user_factors(0), moving.user_factors(1)
    assert not np.allclose(u0, u1)
    np.testing.assert_allclose(u0, moving.u0)
    np.testing.assert_allclose(u1, moving.u0 * np.cos(0.3) + moving.u1 * np.sin(0.3))


def test_overlapped_examples_share_features_and_labels():
    stream = synthetic_stream(SyntheticConfig(num_windows=2, rows_per_window=2000, overlap=0.2))
    table = pa.concat_tables(stream.windows)
    ids = table.column("example_id").to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    assert counts.max() == 2
    doubled = uniq[counts == 2]
    assert 0.15 < len(doubled) / len(uniq) < 0.25
    shared = ["label_click", "user_id", "ad_id", "device", "hour", "bid", "event_time"]
    rows = table.filter(pc.is_in(table.column("example_id"), pa.array(doubled))).sort_by(
        [("example_id", "ascending"), ("tenant", "ascending")]
    )
    first, second = rows.take(pa.array(range(0, rows.num_rows, 2))), rows.take(pa.array(range(1, rows.num_rows, 2)))
    assert np.array_equal(first.column("example_id").to_numpy(), second.column("example_id").to_numpy())
    assert all(
        a != b for a, b in zip(first.column("tenant").to_pylist(), second.column("tenant").to_pylist(), strict=True)
    )
    for name in shared:
        assert first.column(name).equals(second.column(name)), name
    # Each tenant's slot feature is set on its own rows only.
    for name in stream.spec.tenant_names:
        own = pc.equal(table.column("tenant"), name).to_numpy(zero_copy_only=False)
        has_slot = pc.list_value_length(table.column(f"{name}_slot")).to_numpy() > 0
        assert has_slot[own].all()


def test_spec_and_window_layout():
    cfg = SyntheticConfig(num_windows=3, rows_per_window=300, num_tenants=2, window_seconds=3600, start_time=1000)
    stream = synthetic_stream(cfg)
    assert stream.spec.window_starts == [1000, 4600, 8200]
    assert stream.spec.tenant_names == ["feed", "stories"]
    for t, window in enumerate(stream.windows):
        times = window.column("event_time").to_numpy()
        assert times.min() >= 1000 + t * 3600 and times.max() < 1000 + (t + 1) * 3600
        assert (np.diff(times) >= 0).all()
    assert "user_topics" not in stream.spec.tenant("feed").features
