"""`exfm experiment`: run, summarize, write results.json / results.md / ne_per_window.png."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from exfm_ray.data.sources import load_stream
from exfm_ray.experiment.config import ExperimentConfig
from exfm_ray.experiment.report import summarize, write_results
from exfm_ray.experiment.runner import count_steps, run_experiment
from exfm_ray.experiment.sweeps import run_sweep, sweep_points, write_sweep
from exfm_ray.files import json_safe


def experiment(cfg: ExperimentConfig, out_dir: Path, show_progress: bool = True) -> dict:
    start = time.perf_counter()
    stream = load_stream(cfg.source)
    spec = stream.spec
    total = count_steps(cfg, spec.num_windows, len(spec.tenants))
    stats: dict = {}
    with _bar(total, "experiment", show_progress) as progress:
        records = run_experiment(cfg, stream, progress, stats)
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
        "machine": machine(),
        "config": cfg.model_dump(mode="json"),
        **summarize(records, cfg.warmup_windows),
        **stats,
        "records": records,
        "seconds": round(time.perf_counter() - start, 1),
    }
    results = json_safe(results)
    results["paths"] = {k: str(v) for k, v in write_results(results, out_dir).items()}
    return results


def sweep(cfg: ExperimentConfig, name: str, out_dir: Path, show_progress: bool = True) -> dict:
    """`exfm experiment --sweep NAME`: every point of the sweep, then sweep.json/.md/.png."""
    start = time.perf_counter()
    stream = load_stream(cfg.source)
    spec = stream.spec
    points = sweep_points(name, cfg, stream)
    total = sum(count_steps(p, spec.num_windows, len(spec.tenants)) for _, p in points)
    with _bar(total, f"sweep {name}", show_progress) as progress:
        result = run_sweep(name, cfg, stream, progress)
    seconds = round(time.perf_counter() - start, 1)
    result = json_safe({**result, "description": spec.description, "machine": machine(), "seconds": seconds})
    result["paths"] = {k: str(v) for k, v in write_sweep(result, out_dir).items()}
    return result


def machine() -> dict:
    """What the figures depend on beyond the code and the seeds: the FM's training follows the CPU's vector
    kernels (AVX2 against AVX512 moved synthetic-ads-rare's FM NE by 0.9%, docs/results.md "The FM's labels and
    the CPU"), so results from two machines compare only through arms measured in the same run."""
    return {
        "torch": torch.__version__,
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


@contextmanager
def _bar(total: int, desc: str, show: bool):
    with tqdm(total=total, desc=desc, unit="step", disable=not show, leave=False) as bar:

        def progress(n: int, label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(n)

        yield progress
