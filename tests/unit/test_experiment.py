"""The streaming protocol and the experiment's outputs, on a tiny synthetic stream."""

import json

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.stream import Stream
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.experiment.api import experiment
from exfm_ray.experiment.config import ExperimentConfig
from exfm_ray.experiment.report import variants_of
from exfm_ray.experiment.runner import _fm_labels, run_experiment
from exfm_ray.fm.model import FMConfig
from exfm_ray.students.config import DEFAULT_VARIANT

pytestmark = pytest.mark.unit

TINY = {"num_windows": 4, "rows_per_window": 1500, "num_tenants": 2, "num_users": 200, "num_ads": 50}


def tiny_cfg(**changes) -> ExperimentConfig:
    base = {
        "source": {"dataset": "synthetic", "synthetic": TINY},
        "fm": {"size": 1, "epochs_per_window": 1},
        "seeds": 1,
    }
    return ExperimentConfig.parse({**base, **changes})


@pytest.fixture(scope="module")
def stream() -> Stream:
    return SyntheticStream(SyntheticConfig(**TINY)).stream()


def _flip_labels(stream: Stream, t: int) -> Stream:
    windows = list(stream.windows)
    w = windows[t]
    i = w.schema.get_field_index("label_click")
    windows[t] = w.set_column(i, "label_click", pc.subtract(pa.scalar(1.0, pa.float32()), w.column("label_click")))
    return Stream(stream.spec, windows, stream.report)


@pytest.mark.parametrize("delay", [1, 2])
def test_fm_labels_of_a_window_never_see_that_window(stream, delay):
    cfg = tiny_cfg(fm_delay=delay)
    full = [WindowTensors(w, stream.spec) for w in stream.windows]
    a = _fm_labels(cfg, stream, full, seed=0, progress=None)[0]
    flipped = _flip_labels(stream, 2)
    b = _fm_labels(cfg, flipped, [WindowTensors(w, stream.spec) for w in flipped.windows], seed=0, progress=None)[0]
    assert all(x is None for x in a[:delay])  # nothing trained yet: masked
    for t in range(delay, 3):
        assert torch.equal(a[t], b[t]), f"window {t} labels changed when window 2's labels changed"
    if 2 + delay < len(a):
        assert not torch.equal(a[2 + delay], b[2 + delay])  # ... and later windows do learn from it


def test_records_cover_every_variant_tenant_window_and_fm_starts_after_the_delay(stream):
    cfg = tiny_cfg()
    records = run_experiment(cfg, stream)
    keys = {(r["variant"], r["tenant"], r["window"]) for r in records}
    for v in cfg.variants:
        for tenant in stream.spec.tenant_names:
            assert {(v, tenant, t) for t in range(4)} <= keys
    assert {r["window"] for r in records if r["variant"] == "fm"} == {1, 2, 3}
    # Progressive validation: window 0 is scored before any training, so every student agrees there,
    # and each starts at the window's base rate (random heads would score NE ~2 at 10% positives).
    first = {r["variant"]: r["ne"] for r in records if r["window"] == 0 and r["tenant"] == "feed"}
    students = {v: x for v, x in first.items() if v in cfg.variants}
    assert len({round(x, 6) for x in students.values()}) == 1
    assert 0.98 < next(iter(students.values())) < 1.1 and first["base_rate"] == pytest.approx(1.0, abs=1e-3)
    rows = {r["window"]: r["rows"] for r in records if r["variant"] == "vm_only" and r["tenant"] == "feed"}
    assert rows == {t: stream.tenant_rows(t, "feed").num_rows for t in range(4)}
    # the guard's blend: the mean of the default variant's and vm_only's probabilities, never worse
    # than the worse of the two (log loss is convex), and not a copy of either
    loss = {(r["variant"], r["tenant"], r["window"]): r["log_loss"] for r in records}
    blends = [k for k in loss if k[0] == "blend"]
    assert len(blends) == 4 * len(stream.spec.tenant_names)
    for _, tenant, t in blends:
        pair = (loss[(DEFAULT_VARIANT, tenant, t)], loss[("vm_only", tenant, t)])
        assert loss[("blend", tenant, t)] <= max(pair) + 1e-9
    assert any(min(abs(loss[k] - loss[(v, *k[1:])]) for v in (DEFAULT_VARIANT, "vm_only")) > 1e-6 for k in blends)


def test_experiment_writes_json_markdown_and_png(tmp_path):
    default = DEFAULT_VARIANT
    results = experiment(tiny_cfg(seeds=2, variants=["vm_only", "ah", default]), tmp_path, show_progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    guarded = f"{default}+guard"
    assert data["default_variant"] == data["summary"]["default_variant"] == default
    headroom = "fm_headroom"
    expected = {"fm", "vm_only", "ah", default, "blend", "base_rate", guarded, headroom}
    assert set(variants_of(data["summary"])) == expected
    # the FM labels windows 1-3 (delay 1); on the first, with nothing to fit on, the headroom is vm_only itself
    assert [p["window"] for p in data["per_window"][headroom]["feed"]] == [1, 2, 3]
    first = {v: data["per_window"][v]["feed"][1 if v == "vm_only" else 0]["ne"] for v in (headroom, "vm_only")}
    assert first[headroom] == pytest.approx(first["vm_only"], abs=1e-5)
    assert "transfer_ratio" not in data["summary"][headroom]
    assert f"`{headroom}` is a reference" in (tmp_path / "results.md").read_text()
    for s in variants_of(data["summary"]).values():
        assert {"ne_mean", "ne_std", "auc_mean"} <= set(s)
        assert s["seeds"] == 2 and 0.3 < s["ne_mean"] < 1.5
    vm = data["summary"]["vm_only"]
    assert vm["ne_change_vs_vm_only_pct"] == 0.0 and vm["worst_window_vs_vm_only_pct"] == 0.0
    for v in ("ah", default):
        s = data["summary"][v]
        fm, alone = data["summary"]["fm"]["ne_mean"], vm["ne_mean"]
        expected = (alone - s["ne_mean"]) / (alone - fm) if alone > fm else None
        assert s["transfer_ratio"] == (pytest.approx(expected) if expected is not None else None)
    assert set(data["guard"]["served_share"]) <= {"exfm", "control", "base_rate"}
    assert sum(data["guard"]["served_share"].values()) == pytest.approx(1.0)
    per_window = data["per_window"][default]["feed"]
    assert [p["window"] for p in per_window] == [0, 1, 2, 3]
    assert all({"ne", "auc", "calibration", "rows"} <= set(p) for p in per_window)
    md = (tmp_path / "results.md").read_text()
    assert f"| **{default}** (default) |" in md and "| fm |" in md and "| ah |" in md and "Guard" in md
    young = data["young_fm"]  # the young FM's verdict, once per seed (fm_gate_young_z)
    assert [v["seed"] for v in young] == [0, 1] and set(young[0]["on"]) == {default}
    assert f"Young FM (`{default}`): judged to out-rank the students on its first labeled window in " in md
    img = matplotlib.image.imread(tmp_path / "ne_per_window.png")
    assert img.shape[0] > 200 and img.shape[1] > 400 and np.std(img) > 0.01
    assert results["paths"]["json"].endswith("results.json")


def test_fm_delay_zero_is_flagged_leaky(tmp_path):
    results = experiment(tiny_cfg(fm_delay=0, variants=["vm_only"]), tmp_path, show_progress=False)
    assert results["leaky"] is True
    assert "leaky oracle" in (tmp_path / "results.md").read_text()
    # the FM's headroom would read a logit that has seen the window it scores: not reported
    assert "fm_headroom" not in results["summary"] and "fm_headroom" not in (tmp_path / "results.md").read_text()


def test_unknown_variant_is_rejected_naming_the_field():
    from exfm_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="variants"):
        tiny_cfg(variants=["vm_only", "magic"])


def test_fm_config_rejects_bad_sizes():
    from exfm_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="size"):
        FMConfig.parse({"size": 0})
