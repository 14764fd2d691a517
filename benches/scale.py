"""`exfm bench scale`: how the cost of a window grows with its size (issue 17, item 5).

For each window size (synthetic examples; tenant rows are ~1.15x that), in one run:
- the DAS driver is `exfm augment` in a fresh process against this bench's Ray, as a user runs it:
  its peak RSS (the figure that must not grow with the window) and the window's time;
- the FM ranks' and the DAS workers' peak RSS are sampled from /proc while the window runs (the
  largest process of each kind);
- a trainer (a fresh spawned process, one torch thread, as a Ray Train worker) evaluates and
  trains one tenant on the augmented window: its wall time and peak RSS.
Each size gets its own FM group (started before, stopped after) and its own folder, deleted after.
`das_ratio` is `exfm bench das` at its defaults (300,000 examples) run inside this bench.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pydantic import Field

from exfm_ray.bench import figures
from exfm_ray.bench.proc_tree import peak_rss_mb, rss_mb
from exfm_ray.configbase import Config

GROUP = "exfm-bench-scale"
ROLES = {"fm_rank": "FMShard", "das_worker": "DASWorker"}


class ScaleBenchConfig(Config):
    rows: list[int] = Field([100_000, 300_000, 1_000_000, 3_000_000], description="Window sizes (examples).")
    fm_size: int = Field(2, ge=1, description="FM size dial (the cost that grows is the data's, not the FM's).")
    shards: int = Field(2, ge=1, description="FM ranks in the group.")
    workers: int = Field(2, ge=1, description="DAS workers.")
    batch_size: int = Field(8192, gt=0, description="Examples per FM call.")
    train: bool = Field(True, description="Also train one tenant on each window (a trainer's time and memory).")
    das_repeats: int = Field(2, ge=0, description="Rounds of `exfm bench das` for das_ratio (0: skip it).")
    plot: Path | None = Field(Path("runs/bench/scale.png"), description="PNG of the curves; None: no plot.")


def run(cfg: ScaleBenchConfig, log=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="exfm-bench-scale-"))
    try:
        per_size = []
        for n in cfg.rows:
            per_size.append(_size(cfg, n, work / f"w{n}", log))
            shutil.rmtree(work / f"w{n}", ignore_errors=True)
        das = _das_ratio(cfg, log) if cfg.das_repeats else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    driver = [s["driver_peak_rss_mb"] for s in per_size]
    result = {
        "rows": [s["examples"] for s in per_size],
        "tenant_rows": [s["tenant_rows"] for s in per_size],
        "driver_peak_rss_mb": driver,
        "driver_rss_growth": max(driver) / min(driver),
        "das_rows_per_s": [s["das_rows_per_s"] for s in per_size],
        "das_wall_s": [s["das_wall_s"] for s in per_size],
        "fm_rank_peak_rss_mb": [s["fm_rank_peak_rss_mb"] for s in per_size],
        "das_worker_peak_rss_mb": [s["das_worker_peak_rss_mb"] for s in per_size],
        "trainer_wall_s": [s.get("trainer_wall_s") for s in per_size],
        "trainer_peak_rss_mb": [s.get("trainer_peak_rss_mb") for s in per_size],
        "das_ratio": das["ratio"] if das else None,
        "das": das,
        "per_size": per_size,
        "config": cfg.model_dump(mode="json"),
    }
    if cfg.plot is not None:
        result["plot"] = str(plot(result, cfg.plot))
    return result


def _size(cfg: ScaleBenchConfig, n: int, root: Path, log) -> dict:
    import ray

    from actors.fm_group import FMGroupConfig
    from actors.launch import start_fm_group, stop_fm_group

    spec, tenant_rows = _write_stream(cfg, n, root)
    group = start_fm_group(  # the handle keeps the (non-detached) group alive
        FMGroupConfig(name=GROUP, storage=str(root), num_shards=cfg.shards, threads_per_shard=1), detached=False
    )
    try:
        while ray.get(group.status.remote()).version is None:
            time.sleep(0.5)
        with _RolePeaks() as peaks:
            driver = _driver(cfg, root)
    finally:
        stop_fm_group(GROUP)
    out = {
        "examples": n,
        "tenant_rows": tenant_rows,
        "das_wall_s": round(driver["wall_s"], 2),
        "das_rows_per_s": driver["fm_calls"] / driver["wall_s"],
        "das_tenant_rows_per_s": tenant_rows / driver["wall_s"],
        "driver_peak_rss_mb": driver["peak_rss_mb"],
        "das_command_s": round(driver["command_s"], 2),
        **{f"{role}_peak_rss_mb": peak for role, peak in peaks.peak_mb.items()},
    }
    if cfg.train:
        out.update(_trainer(root))
    log(
        f"{n:>9,} examples ({tenant_rows:,} rows): DAS {out['das_wall_s']:.1f} s, {out['das_rows_per_s']:,.0f} "
        f"examples/s | peak RSS MB: driver {out['driver_peak_rss_mb']:.0f}, FM rank {out['fm_rank_peak_rss_mb']:.0f}, "
        f"DAS worker {out['das_worker_peak_rss_mb']:.0f}"
        + (f", trainer {out['trainer_peak_rss_mb']:.0f} ({out['trainer_wall_s']:.1f} s)" if cfg.train else "")
    )
    return out


def _write_stream(cfg: ScaleBenchConfig, n: int, root: Path):
    """Window 1 holds the n examples; window 0 is a sliver (the FM version's watermark is before
    window 1, so the leakage guard passes)."""
    import torch

    from exfm_ray.data.stream import Stream
    from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
    from exfm_ray.fm.model import FMConfig, build_fm
    from exfm_ray.fm.registry import FMRegistry, publish_model

    stream = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=n, num_tenants=3)).stream()
    window = stream.windows[1]
    Stream(stream.spec, [stream.windows[0].slice(0, 1000), window], stream.report).write(root / "stream")
    fm_cfg = FMConfig(size=cfg.fm_size)
    torch.manual_seed(0)
    fm = build_fm(stream.spec, fm_cfg).eval()
    watermark = stream.spec.window_starts[1] - 1
    publish_model(FMRegistry(root), fm, stream.spec, fm_cfg, watermark=watermark, through_window=0)
    return stream.spec, window.num_rows


def _driver(cfg: ScaleBenchConfig, root: Path) -> dict:
    """`exfm augment` for window 1, as a user runs it, in a fresh process: its peak RSS is its own
    VmHWM (not ru_maxrss: a child forked from this bench inherits this process's high-water mark),
    its window time is the manifest's."""
    import ray

    from exfm_ray.das.store import AugmentedStore

    exfm = Path(sys.executable).with_name("exfm")
    args = [str(exfm), "augment", "--windows", "1", "--stream", str(root / "stream"), "--storage", str(root),
            "--address", ray.get_runtime_context().gcs_address, "--group", GROUP,
            "--batch-size", str(cfg.batch_size), "--workers", str(cfg.workers)]  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak = 0.0
        while proc.poll() is None:  # VmHWM only grows: its last reading is the peak
            peak = max(peak, peak_rss_mb(proc.pid))
            time.sleep(0.1)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"exfm augment failed (rc {proc.returncode}):\n{err.read()[-3000:]}")
    record = AugmentedStore(root).records()[1]
    assert record.output_rows == record.input_rows, record
    return {
        "wall_s": record.duration_s,
        "command_s": time.perf_counter() - start,
        "fm_calls": record.fm_calls,
        "peak_rss_mb": peak,
    }


def _trainer(root: Path) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_train_window, str(root)).result()


def _train_window(root: str) -> dict:
    """One tenant's window in this (fresh) process, one torch thread as a Ray Train worker."""
    import torch

    from exfm_ray.das.store import AugmentedStore
    from exfm_ray.tenants.config import TenantConfig, resolve
    from exfm_ray.tenants.run import TenantRun

    torch.set_num_threads(1)
    store = AugmentedStore(root)
    run = TenantRun(resolve(TenantConfig(name="feed", guard=False), store.spec()))
    start = time.perf_counter()
    record = run.window(1, store.read_window(1, columns=run.view.columns))
    return {
        "trainer_wall_s": round(time.perf_counter() - start, 2),
        "trainer_rows": record["rows"],
        "trainer_peak_rss_mb": peak_rss_mb(os.getpid()),
    }


class _RolePeaks:
    """Peak RSS of the largest process of each role (by its Ray process title), sampled from /proc."""

    def __init__(self, every_s: float = 0.25):
        self.every_s = every_s
        self.peak_mb = dict.fromkeys(ROLES, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    title = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace")
                except OSError:  # the process ended meanwhile
                    continue
                role = next((r for r, mark in ROLES.items() if mark in title), None)
                if role is not None:
                    self.peak_mb[role] = max(self.peak_mb[role], rss_mb(int(entry.name)))


def _das_ratio(cfg: ScaleBenchConfig, log) -> dict:
    from benches import das

    log(f"exfm bench das (defaults, {cfg.das_repeats} rounds) for das_ratio ...")
    result = das.run(das.DasBenchConfig(repeats=cfg.das_repeats), log=lambda *_: None)
    log(das.summary(result))
    return result


def plot(r: dict, path: Path) -> Path:
    x = r["rows"]
    fig, axes = figures.pyplot().subplots(1, 2, figsize=(11, 4))
    lines = {"driver_peak_rss_mb": "DAS driver", "fm_rank_peak_rss_mb": "FM rank",
             "das_worker_peak_rss_mb": "DAS worker", "trainer_peak_rss_mb": "trainer (1 tenant)"}  # fmt: skip
    for key, label in lines.items():
        if all(v is not None for v in r[key]):
            axes[0].plot(x, r[key], "o-", label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="window (examples)", ylabel="peak RSS (MB)")
    axes[0].set_title("memory per process")
    axes[0].legend()
    axes[1].plot(x, r["das_wall_s"], "o-", label="DAS")
    if all(v is not None for v in r["trainer_wall_s"]):
        axes[1].plot(x, r["trainer_wall_s"], "s--", label="trainer (1 tenant)")
    axes[1].set(xscale="log", yscale="log", xlabel="window (examples)", ylabel="wall time per window (s)")
    axes[1].legend()
    return figures.save(fig, path)


def summary(r: dict) -> str:
    sizes = zip(r["rows"], r["driver_peak_rss_mb"], r["das_rows_per_s"], strict=True)
    rows = ", ".join(f"{n:,}: {d:.0f} MB / {v:,.0f} ex/s" for n, d, v in sizes)
    ratio = f" | das_ratio {r['das_ratio']:.2f}" if r["das_ratio"] is not None else ""
    return f"DAS driver peak RSS / rate by window: {rows} | growth {r['driver_rss_growth']:.2f}x{ratio}"
