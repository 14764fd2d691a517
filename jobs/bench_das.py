"""`exfm bench das`: the DAS pipeline vs the FM forward called in-process, in one run.

(a) in-process: the same FM version, unsharded, in this process with every core, labeling the
    window's unique examples in the DAS's batch size (just the forward: the ceiling).
(b) DAS: the whole pipeline for the same window through Ray Data and the FM group (both
    passes, Parquet write and commit), FM start-up excluded.
Both rates count unique examples labeled per second; the ratio is b / a.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.das.columns import first_occurrence
from exfm_ray.das.local import LocalLabeler
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.model import FMConfig, build_fm, count_parameters
from exfm_ray.fm.registry import FMRegistry, publish_model


class DasBenchConfig(Config):
    rows: int = Field(60_000, gt=0, description="Examples in the benchmark window.")
    fm_size: int = Field(5, ge=1, description="FM size dial (the FM is the expensive part of the DAS).")
    batch_size: int = Field(8192, gt=0, description="Rows per FM call, in both arms.")
    shards: int = Field(2, ge=1, description="FM ranks in the group.")
    labelers: int = Field(2, ge=1, description="FMLabeler actors.")
    repeats: int = Field(2, ge=1, description="Timed repetitions per arm (best is kept).")


def run_das_bench(cfg: DasBenchConfig, workdir: Path | None = None, log=print) -> dict:
    import ray

    from actors.fm_group import FMGroupConfig
    from actors.launch import start_fm_group, stop_fm_group
    from exfm_ray.das.pipeline import AugmentConfig, Augmenter

    root = Path(workdir or tempfile.mkdtemp(prefix="exfm-bench-das-"))
    stream = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=cfg.rows, num_tenants=3)).stream()
    stream.write(root / "stream")
    fm_cfg = FMConfig(size=cfg.fm_size)
    torch.manual_seed(0)
    fm = build_fm(stream.spec, fm_cfg).eval()
    version = publish_model(
        FMRegistry(root), fm, stream.spec, fm_cfg, watermark=stream.spec.window_starts[1] - 1, through_window=0
    )
    window = stream.windows[1]
    unique = window.filter(pa.array(first_occurrence(window.column("example_id").to_numpy())))
    batches = [unique.slice(i, cfg.batch_size) for i in range(0, unique.num_rows, cfg.batch_size)]
    log(f"window: {window.num_rows} tenant rows, {unique.num_rows} unique examples; FM {count_parameters(fm):,} params")

    labeler = LocalLabeler(fm, version)
    labeler.label(batches[0])  # warm-up
    inproc = min(_timed(lambda: [labeler.label(b) for b in batches]) for _ in range(cfg.repeats))
    log(f"(a) in-process FM forward: {unique.num_rows / inproc:,.0f} rows/s")

    group_name = "exfm-bench-fm"
    # Keep the handle: a non-detached actor dies with its last handle.
    group = start_fm_group(
        FMGroupConfig(name=group_name, storage=str(root), num_shards=cfg.shards, threads_per_shard=1), detached=False
    )
    try:
        ray.get(group.label.remote(batches[0]))  # warm-up
        times = []
        for rep in range(cfg.repeats):
            storage = root / f"run{rep}"
            _link_registry(root, storage)
            aug = Augmenter(
                AugmentConfig(
                    storage=str(storage),
                    stream=str(root / "stream"),
                    group_name=group_name,
                    batch_size=cfg.batch_size,
                    labelers=cfg.labelers,
                )
            )
            times.append(_timed(lambda aug=aug: aug.augment(1)))
            log(f"(b) DAS run {rep}: {unique.num_rows / times[-1]:,.0f} rows/s ({times[-1]:.2f} s)")
        das = min(times)
    finally:
        stop_fm_group(group_name)
    result = {
        "inprocess_rows_per_s": unique.num_rows / inproc,
        "das_rows_per_s": unique.num_rows / das,
        "ratio": inproc / das,
        "tenant_rows_per_s": window.num_rows / das,
        "unique_examples": unique.num_rows,
        "tenant_rows": window.num_rows,
        "fm_params": count_parameters(fm),
        "fm_size": cfg.fm_size,
        "batch_size": cfg.batch_size,
        "shards": cfg.shards,
        "torch_threads_inprocess": torch.get_num_threads(),
    }
    return result


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _link_registry(root: Path, storage: Path) -> None:
    (storage / "fm").mkdir(parents=True)
    (storage / "fm" / "registry.json").write_text((root / "fm" / "registry.json").read_text())
    (storage / "fm" / "versions").symlink_to(root / "fm" / "versions")
