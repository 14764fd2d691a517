"""Model tier: the ExFM recipe must move knowledge from the FM into students on the synthetic
stream. Deterministic (fixed seeds, one thread), so a regression in models, losses or the
protocol shows up as a failure, not as noise."""

import pytest

from exfm_ray.data.synthetic import SyntheticConfig
from exfm_ray.experiment.config import ExperimentConfig
from exfm_ray.experiment.report import summarize
from exfm_ray.experiment.runner import run_experiment

pytestmark = pytest.mark.slow


def test_fm_beats_vm_only_and_ah_sa_beats_vm_only_on_synthetic(one_thread):
    cfg = ExperimentConfig(
        source={"dataset": "synthetic", "synthetic": SyntheticConfig(num_windows=6, rows_per_window=15000)},
        variants=["vm_only", "ah_sa"],
        seeds=1,
    )
    summary = summarize(run_experiment(cfg), cfg.warmup_windows)["summary"]
    fm, vm, ah_sa = (summary[v]["ne_mean"] for v in ("fm", "vm_only", "ah_sa"))
    assert fm < vm * 0.97, summary  # the teacher is clearly better than the student alone
    assert ah_sa < vm * 0.997, summary  # ... and distillation carries part of that into the student
