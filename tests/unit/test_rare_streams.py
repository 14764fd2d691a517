"""Rare-positive streams: the ads-like synthetic presets and positives dropped from real data."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from exfm_ray.data.presets import PRESETS, RARE_STREAMS, preset, source_fields
from exfm_ray.data.rare import keep_probability, thin_positives
from exfm_ray.data.sources import SourceConfig, load_stream
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream, synthetic_stream
from exfm_ray.errors import ConfigError

pytestmark = pytest.mark.unit


def _rate(stream) -> float:
    return float(pc.mean(pa.concat_tables(stream.windows).column("label_click")).as_py())


def test_keep_probability_reaches_the_target():
    q = keep_probability(0.5, 0.01)
    assert q * 0.5 / (q * 0.5 + 0.5) == pytest.approx(0.01)
    assert keep_probability(0.005, 0.01) == 1.0  # already rarer: nothing dropped
    with pytest.raises(ConfigError, match="positive_rate"):
        keep_probability(0.5, 1.5)


def test_thinning_drops_only_positives_and_counts_them():
    stream = synthetic_stream(SyntheticConfig(num_windows=3, rows_per_window=4000, positive_rate=0.2))
    thin = thin_positives(stream, 0.02, seed=1)
    before = pa.concat_tables(stream.windows)
    after = pa.concat_tables(thin.windows)
    assert _rate(thin) == pytest.approx(0.02, abs=0.006)
    negatives = pc.equal(before.column("label_click"), 0.0)
    assert after.filter(pc.equal(after.column("label_click"), 0.0)).num_rows == before.filter(negatives).num_rows
    dropped = before.num_rows - after.num_rows
    assert sum(thin.report.excluded.values()) == dropped > 0
    assert "0.02" in thin.spec.description and thin.spec.name == "synthetic-rare"
    assert [w.num_rows > 0 for w in thin.windows] == [True] * 3


def test_thinning_keeps_or_drops_every_row_of_an_example_together():
    stream = synthetic_stream(SyntheticConfig(num_windows=2, rows_per_window=3000, positive_rate=0.3, overlap=0.5))
    thin = thin_positives(stream, 0.05)
    for before, after in zip(stream.windows, thin.windows, strict=True):
        counts_before = pc.value_counts(before.column("example_id")).to_pylist()
        kept = set(after.column("example_id").to_pylist())
        shared = [c["values"] for c in counts_before if c["counts"] == 2]
        after_counts = {c["values"]: c["counts"] for c in pc.value_counts(after.column("example_id")).to_pylist()}
        assert all(after_counts[i] == 2 for i in shared if i in kept)


def test_cold_ids_join_after_the_first_window_and_the_head_is_heavier():
    cfg = SyntheticConfig(num_windows=4, rows_per_window=3000, cold_share=0.4, num_users=500, num_ads=100)
    gen = SyntheticStream(cfg)
    assert (gen.user_joins > 0).mean() == pytest.approx(0.4, abs=0.08)
    w0 = gen.window(0)
    users0 = {v[0] for v in w0.column("user_id").to_pylist()}
    assert users0.isdisjoint(set(np.flatnonzero(gen.user_joins > 0)))
    later = {v[0] for v in gen.window(3).column("user_id").to_pylist()}
    assert later & set(np.flatnonzero(gen.user_joins > 0))  # cold users show up later
    heavy = SyntheticStream(cfg.replace(zipf_exponent=1.3, cold_share=0.0))
    assert (
        np.sort(heavy.user_pop)[-10:].sum() > np.sort(SyntheticStream(cfg.replace(cold_share=0.0)).user_pop)[-10:].sum()
    )


def test_default_synthetic_stream_is_unchanged_by_the_new_knobs():
    # cold_share 0 draws nothing: the default stream (and every earlier result) stays the same
    a = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=500))
    assert (a.user_joins == 0).all() and (a.ad_joins == 0).all()


@pytest.mark.parametrize("rate", [0.01, 0.002])
def test_ads_presets_have_ads_positive_rates(rate):
    name = {0.01: "synthetic-ads", 0.002: "synthetic-ads-rare"}[rate]
    fields = preset(name)
    fields["synthetic"].update(num_windows=2, rows_per_window=20_000)
    stream = load_stream(SourceConfig.parse(fields))
    assert _rate(stream) == pytest.approx(rate, rel=0.35)
    counts = pc.value_counts(stream.windows[0].column("tenant")).to_pylist()
    shares = sorted(c["counts"] for c in counts)
    assert shares[0] < 0.3 * shares[-1]  # one small tenant


def test_real_rare_presets(data_dir):
    for name in ("movielens-rare", "frappe-rare"):
        stream = load_stream(SourceConfig.parse({**preset(name), "data_dir": data_dir}))
        assert _rate(stream) == pytest.approx(0.01, abs=0.003)
        assert "positives dropped" in stream.report.summary()
    assert load_stream(SourceConfig.parse({**preset("movielens-rare"), "data_dir": data_dir})).spec.num_windows == 8


def test_every_rare_stream_is_a_named_preset_and_unknown_names_fail():
    assert set(RARE_STREAMS) < set(PRESETS)
    with pytest.raises(ConfigError, match="unknown dataset"):
        preset("criteo")


def test_source_fields_layers_preset_yaml_and_flags():
    out = source_fields("synthetic-ads", base={"synthetic": {"num_windows": 5}}, rows_per_window=1000, data_dir="/d")
    assert out["synthetic"]["num_windows"] == 5 and out["synthetic"]["rows_per_window"] == 1000
    assert out["synthetic"]["positive_rate"] == 0.01 and out["data_dir"] == "/d"
    demo = source_fields("synthetic", synthetic_defaults={"num_tenants": 2}, num_tenants=3)
    assert demo["synthetic"]["num_tenants"] == 3
    assert source_fields("synthetic-ads", synthetic_defaults={"num_tenants": 2})["synthetic"]["num_tenants"] == 3
    assert source_fields("frappe", num_windows=4)["num_windows"] == 4
    byo = source_fields("synthetic", data_path="x.csv", mapping_path="m.yaml")
    assert byo["dataset"] == "byo" and byo["data_path"] == "x.csv"
