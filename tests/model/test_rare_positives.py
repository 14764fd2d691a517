"""Model tier on rare positives: the default variant must beat the student alone and match
single-head KD where ads live (1% positives, a small tenant), and the guard must keep the served
model within 1% of the student alone. Deterministic (fixed seeds, one thread): a regression in the
method's defaults shows up as a failure, not as noise."""

import pytest

from exfm_ray.data.presets import preset
from exfm_ray.experiment.config import ExperimentConfig
from exfm_ray.experiment.guarded import worst_excess
from exfm_ray.experiment.report import summarize
from exfm_ray.experiment.runner import run_experiment
from exfm_ray.students.config import DEFAULT_VARIANT

pytestmark = pytest.mark.slow


def _run(source: dict) -> tuple[dict, list[dict], ExperimentConfig]:
    cfg = ExperimentConfig(source=source, variants=["vm_only", "kd_single_head", DEFAULT_VARIANT], seeds=1)
    records = run_experiment(cfg)
    return summarize(records, cfg.warmup_windows), records, cfg


def test_default_beats_vm_only_and_matches_kd_at_one_percent_positives(one_thread):
    source = preset("synthetic-ads")
    source["synthetic"].update(num_windows=5, rows_per_window=20_000)
    results, records, cfg = _run(source)
    s = results["summary"]
    vm, kd, default = (s[v]["ne_mean"] for v in ("vm_only", "kd_single_head", DEFAULT_VARIANT))
    assert default < vm * 0.998, s  # the FM's knowledge reaches the served head (measured: -0.44%)
    assert default <= kd * 1.001, s  # ... at least as well as single-head KD
    assert s[DEFAULT_VARIANT]["worst_window_vs_vm_only_pct"] < 2.0, s
    guarded = f"{DEFAULT_VARIANT}+guard"
    assert worst_excess(records, guarded, "vm_only", 3, cfg.warmup_windows) <= 1.0


def test_default_is_no_worse_than_vm_only_on_frappe_at_one_percent(one_thread, data_dir):
    results, records, cfg = _run({**preset("frappe-rare"), "data_dir": data_dir, "num_windows": 6})
    s = results["summary"]
    vm, kd, default = (s[v]["ne_mean"] for v in ("vm_only", "kd_single_head", DEFAULT_VARIANT))
    assert default < vm, s
    assert s[DEFAULT_VARIANT]["worst_window_vs_vm_only_pct"] < 2.0, s
    assert worst_excess(records, f"{DEFAULT_VARIANT}+guard", "vm_only", 3, cfg.warmup_windows) <= 1.0
