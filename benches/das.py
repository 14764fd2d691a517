"""`exfm bench das`: the DAS pipeline vs the FM forward called in-process, in one run.

(a) in-process: the same FM version, unsharded, in this process with every core, labeling the
    window's unique examples in the DAS's batch size (just the forward: the ceiling).
(b) DAS: the whole pipeline for the same window through Ray Data and the FM group (read, dedup,
    the DAS workers' reads, FM calls and Parquet writes, and the commit), FM start-up excluded.
Both rates count unique examples labeled per second; the ratio is b / a. The arms alternate, each
keeps its best round (the machine may be shared).

Also measured, so that a big window does not hide fixed costs:
- fixed overhead: the DAS time of a tiny window (`overhead_rows` examples: Ray Data plan, labeler
  pool start, commit), reported on its own; also once cold (the cluster's first Ray Data job);
- the FM group called directly from the driver on the same batches (what the FM part can do);
- the DAS's phases for its best round (Augmenter.timings).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.das.columns import first_occurrence
from exfm_ray.das.local import LocalLabeler
from exfm_ray.data.stream import Stream
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.model import FMConfig, build_fm, count_parameters
from exfm_ray.fm.registry import FMRegistry, publish_model


class DasBenchConfig(Config):
    rows: int = Field(300_000, gt=0, description="Examples in the benchmark window.")
    fm_size: int = Field(5, ge=1, description="FM size dial (the FM is the expensive part of the DAS).")
    batch_size: int = Field(8192, gt=0, description="Examples per FM call, in both arms.")
    shards: int = Field(2, ge=1, description="FM ranks in the group.")
    labelers: int = Field(1, ge=1, description="DAS workers (AugmentConfig.workers).")
    in_flight: int = Field(4, ge=1, description="FM calls in flight per DAS worker.")
    repeats: int = Field(3, ge=1, description="Timed rounds per arm, alternating (best is kept).")
    overhead_rows: int = Field(1000, ge=100, description="Examples in the tiny window that measures fixed cost.")


def run(cfg: DasBenchConfig, workdir: Path | None = None, log=print) -> dict:
    root = Path(workdir or tempfile.mkdtemp(prefix="exfm-bench-das-"))
    try:
        return _run(cfg, root, log)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _run(cfg: DasBenchConfig, root: Path, log) -> dict:
    import ray

    from actors.fm_group import FMGroupConfig
    from actors.launch import start_fm_group, stop_fm_group
    from exfm_ray.das.pipeline import AugmentConfig, Augmenter

    stream = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=cfg.rows, num_tenants=3)).stream()
    stream.write(root / "stream")
    window = stream.windows[1]
    # The tiny window: the first rows of the same window (same spec, same FM version).
    Stream(stream.spec, [stream.windows[0], window.slice(0, cfg.overhead_rows)], stream.report).write(root / "tiny")
    fm_cfg = FMConfig(size=cfg.fm_size)
    torch.manual_seed(0)
    fm = build_fm(stream.spec, fm_cfg).eval()
    version = publish_model(
        FMRegistry(root), fm, stream.spec, fm_cfg, watermark=stream.spec.window_starts[1] - 1, through_window=0
    )
    unique = window.filter(pa.array(first_occurrence(window.column("example_id").to_numpy())))
    batches = [unique.slice(i, cfg.batch_size) for i in range(0, unique.num_rows, cfg.batch_size)]
    log(f"window: {window.num_rows} tenant rows, {unique.num_rows} unique examples; FM {count_parameters(fm):,} params")

    labeler = LocalLabeler(fm, version)
    labeler.label(batches[0])  # warm-up
    group_name = "exfm-bench-fm"
    # Keep the handle: a non-detached actor dies with its last handle.
    group = start_fm_group(
        FMGroupConfig(name=group_name, storage=str(root), num_shards=cfg.shards, threads_per_shard=1), detached=False
    )
    runs = 0

    def das(stream_dir: str) -> tuple[float, dict]:
        nonlocal runs
        runs += 1
        storage = root / f"run{runs}"
        _link_registry(root, storage)
        aug = Augmenter(
            AugmentConfig(
                storage=str(storage),
                stream=stream_dir,
                group_name=group_name,
                batch_size=cfg.batch_size,
                workers=cfg.labelers,
                in_flight_per_worker=cfg.in_flight,
            )
        )
        took = _timed(lambda: aug.augment(1))
        shutil.rmtree(storage)  # hundreds of MB per run at the default size
        return took, aug.timings

    try:
        ray.get(group.label.remote(batches[0]))  # warm-up
        # The first Ray Data job of a cluster also starts Ray Data's own actors (stats, autoscaling
        # coordinator, locality tracker): the cold tiny window shows it, later ones do not pay it.
        cold = das(str(root / "tiny"))[0]
        log(f"tiny window ({cfg.overhead_rows} examples), first Ray Data job of the cluster: {cold:.2f} s")
        inproc, best, group_direct, overhead = [], (float("inf"), {}), [], []
        for rep in range(cfg.repeats):
            inproc.append(_timed(lambda: [labeler.label(b) for b in batches]))
            log(f"(a) in-process FM forward, round {rep}: {unique.num_rows / inproc[-1]:,.0f} rows/s")
            took, phases = das(str(root / "stream"))
            log(f"(b) DAS, round {rep}: {unique.num_rows / took:,.0f} rows/s ({took:.2f} s) {phases}")
            best = min(best, (took, phases), key=lambda x: x[0])
            group_direct.append(_timed(lambda: _label_through_group(group, batches, cfg.labelers * cfg.in_flight)))
            overhead.append(das(str(root / "tiny"))[0])
            direct = unique.num_rows / group_direct[-1]
            log(f"    FM group direct {direct:,.0f} rows/s; tiny window {overhead[-1]:.2f} s")
    finally:
        stop_fm_group(group_name)
    a, b = min(inproc), best[0]
    return {
        "inprocess_rows_per_s": unique.num_rows / a,
        "das_rows_per_s": unique.num_rows / b,
        "ratio": a / b,
        "tenant_rows_per_s": window.num_rows / b,
        "fm_group_direct_rows_per_s": unique.num_rows / min(group_direct),
        "das_fixed_overhead_s": min(overhead),
        "das_fixed_overhead_cold_s": cold,
        "overhead_window_examples": cfg.overhead_rows,
        "das_phases_s": best[1],
        "unique_examples": unique.num_rows,
        "tenant_rows": window.num_rows,
        "fm_params": count_parameters(fm),
        "fm_size": cfg.fm_size,
        "batch_size": cfg.batch_size,
        "shards": cfg.shards,
        "labelers": cfg.labelers,
        "in_flight_per_labeler": cfg.in_flight,
        "repeats": cfg.repeats,
        "torch_threads_inprocess": torch.get_num_threads(),
    }


def _label_through_group(group, batches: list[pa.Table], in_flight: int) -> None:
    """The FM group called from the driver with `in_flight` calls outstanding (no Ray Data)."""
    import ray

    pending = []
    for b in batches:
        if len(pending) >= in_flight:
            _, pending = ray.wait(pending, num_returns=1)
        pending.append(group.label.remote(b))
    ray.get(pending)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _link_registry(root: Path, storage: Path) -> None:
    (storage / "fm").mkdir(parents=True)
    (storage / "fm" / "registry.json").write_text((root / "fm" / "registry.json").read_text())
    (storage / "fm" / "versions").symlink_to(root / "fm" / "versions")


def summary(r: dict) -> str:
    return (
        f"in-process FM forward {r['inprocess_rows_per_s']:,.0f} rows/s | DAS {r['das_rows_per_s']:,.0f} "
        f"rows/s | ratio {r['ratio']:.2f} | window {r['unique_examples']:,} examples | fixed overhead "
        f"{r['das_fixed_overhead_s']:.2f} s ({r['overhead_window_examples']:,}-example window)"
    )
