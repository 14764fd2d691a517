"""LoopFM in the experiment: rows of window t read only embeddings of windows before t."""

import numpy as np
import pytest
import torch

from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.errors import ConfigError
from exfm_ray.experiment.config import ExperimentConfig
from exfm_ray.experiment.runner import run_experiment
from exfm_ray.loopfm.config import LoopFMConfig
from exfm_ray.loopfm.replay import attach_histories

pytestmark = pytest.mark.unit

TINY = {"num_windows": 4, "rows_per_window": 800, "num_tenants": 2, "num_users": 60, "num_ads": 30}


def test_no_row_of_window_t_sees_window_t():
    stream = SyntheticStream(SyntheticConfig(**TINY)).stream()
    full = [WindowTensors(w, stream.spec) for w in stream.windows]
    parts = [[WindowTensors(w, stream.spec)] for w in stream.windows]
    # window t's embeddings all equal t + 1 (window 0 unlabeled, as with an FM delay of 1); attention
    # pooling: the rows carry their K events (the parameter-free poolings hand on the pooled vector)
    hidden = [None] + [torch.full((w.num_rows, 4), float(t + 1)) for t, w in enumerate(stream.windows)][1:]
    manifest = attach_histories(
        LoopFMConfig.model_validate({"store": {"k": 4}, "pooling": "attention"}), full, parts, hidden
    )
    assert sorted(manifest) == ["1", "2", "3"]
    for t, [rows] in enumerate(parts):
        hist, kept = rows.history.rows(0, rows.num_rows)
        seen = hist[:, 0, :, 0][torch.arange(4).view(1, 4) >= 4 - kept]
        assert float(torch.cat([seen, torch.zeros(1)]).max()) <= t, f"window {t} read its own or a later window"
        if t >= 2:
            assert float(seen.max()) == t  # ... and does read the window just before it
    assert int(parts[1][0].history.rows(0, parts[1][0].num_rows)[1].sum()) == 0  # nothing committed before window 1


def test_unknown_store_key_names_it():
    cfg = ExperimentConfig.parse(
        {
            "source": {"dataset": "synthetic", "synthetic": TINY},
            "seeds": 1,
            "variants": ["loopfm"],
            "student": {"loopfm": {"store": {"keys": ["shopper"]}}},
        }
    )
    with pytest.raises(ConfigError, match="shopper"):
        run_experiment(cfg)


def test_loopfm_variants_run_and_differ_from_the_student_alone():
    cfg = ExperimentConfig.parse(
        {"source": {"dataset": "synthetic", "synthetic": TINY}, "seeds": 1, "variants": ["vm_only", "kd_sa+loopfm"]}
    )
    stats: dict = {}
    recs = run_experiment(cfg, stats=stats)
    ne = {v: [r["ne"] for r in recs if r["variant"] == v] for v in cfg.variants}
    assert all(np.isfinite(ne["kd_sa+loopfm"]))
    assert ne["kd_sa+loopfm"] != ne["vm_only"]
    [store] = stats["loopfm_store"]  # one seed: the store's size as of its last window
    assert store["window"] == 3 and 0 < store["entities"]["user_id"] <= TINY["num_users"] and store["bytes"] > 0
