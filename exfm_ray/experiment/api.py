"""`exfm experiment`: run, summarize, write results.json / results.md / ne_per_window.png."""

from __future__ import annotations

import math
import time
from pathlib import Path

from tqdm import tqdm

from exfm_ray.data.sources import load_stream
from exfm_ray.experiment.config import ExperimentConfig
from exfm_ray.experiment.report import summarize, write_results
from exfm_ray.experiment.runner import count_steps, run_experiment


def experiment(cfg: ExperimentConfig, out_dir: Path, show_progress: bool = True) -> dict:
    start = time.perf_counter()
    stream = load_stream(cfg.source)
    spec = stream.spec
    total = count_steps(cfg, spec.num_windows, len(spec.tenants))
    with tqdm(total=total, desc="experiment", unit="step", disable=not show_progress, leave=False) as bar:

        def progress(n: int, label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(n)

        records = run_experiment(cfg, stream, progress)
    results = {
        "dataset": spec.name,
        "description": spec.description,
        "load_report": stream.report.summary(),
        "windows": spec.num_windows,
        "rows_per_window": [w.num_rows for w in stream.windows],
        "tenants": spec.tenant_names,
        "seeds": cfg.seeds,
        "fm_delay": cfg.fm_delay,
        "warmup": cfg.warmup_windows,
        "leaky": cfg.leaky,
        "config": cfg.model_dump(mode="json"),
        **summarize(records, cfg.warmup_windows),
        "records": records,
        "seconds": round(time.perf_counter() - start, 1),
    }
    results = _clean(results)
    results["paths"] = {k: str(v) for k, v in write_results(results, out_dir).items()}
    return results


def _clean(obj):
    """NaN -> None so results.json is strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj
