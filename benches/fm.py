"""`exfm bench fm`: rows/s the FM group labels with 1 and 2 ranks, against the same FM in-process.

Sequential calls measure latency-bound throughput; `concurrency` calls in flight let the group
pipeline (each rank runs calls in order, so a rank never idles while the supervisor gathers).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import torch
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.das.local import LocalLabeler
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.model import FMConfig, build_fm, count_parameters
from exfm_ray.fm.registry import FMRegistry, publish_model


class FMBenchConfig(Config):
    rows: int = Field(32_768, gt=0, description="Rows labeled per measurement.")
    batch_size: int = Field(8192, gt=0, description="Rows per call.")
    fm_size: int = Field(5, ge=1, description="FM size dial.")
    shards: list[int] = Field(default_factory=lambda: [1, 2], description="Rank counts to measure.")
    concurrency: int = Field(4, ge=1, description="Calls in flight in the pipelined measurement.")
    sharding_type: str = Field("table_wise", description="Sharding type of the group.")


def run(cfg: FMBenchConfig, workdir: Path | None = None, log=print) -> dict:
    import ray

    from actors.fm_group import FMGroupConfig
    from actors.launch import start_fm_group, stop_fm_group
    from exfm_ray.fm.config import ShardingConfig

    root = Path(workdir or tempfile.mkdtemp(prefix="exfm-bench-fm-"))
    stream = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=cfg.rows, overlap=0.0)).stream()
    fm_cfg = FMConfig(size=cfg.fm_size)
    torch.manual_seed(0)
    fm = build_fm(stream.spec, fm_cfg).eval()
    version = publish_model(FMRegistry(root), fm, stream.spec, fm_cfg, watermark=0, through_window=0)
    table = stream.windows[1].slice(0, cfg.rows)
    batches = [table.slice(i, cfg.batch_size) for i in range(0, table.num_rows, cfg.batch_size)]
    rows = sum(b.num_rows for b in batches)
    local = LocalLabeler(fm, version)
    local.label(batches[0])
    inproc = rows / _timed(lambda: [local.label(b) for b in batches])
    result = {"fm_params": count_parameters(fm), "batch_size": cfg.batch_size, "inprocess_rows_per_s": inproc}
    log(f"in-process ({torch.get_num_threads()} threads): {inproc:,.0f} rows/s; FM {result['fm_params']:,} params")
    for n in cfg.shards:
        name = f"exfm-bench-fm-{n}"
        group_cfg = FMGroupConfig(
            name=name, storage=str(root), num_shards=n, sharding=ShardingConfig(sharding_type=cfg.sharding_type)
        )
        group = start_fm_group(group_cfg, detached=False)
        try:
            ray.get(group.label.remote(batches[0]))
            seq = rows / _timed(lambda group=group: [ray.get(group.label.remote(b)) for b in batches])

            async def pipelined(group=group):
                sem = asyncio.Semaphore(cfg.concurrency)

                async def one(b):
                    async with sem:
                        return await group.label.remote(b)

                await asyncio.gather(*(one(b) for b in batches))

            pipe = rows / _timed(lambda pipelined=pipelined: asyncio.run(pipelined()))
        finally:
            stop_fm_group(name)
        result[f"group_{n}_ranks_rows_per_s"] = seq
        result[f"group_{n}_ranks_pipelined_rows_per_s"] = pipe
        log(
            f"group with {n} rank(s): {seq:,.0f} rows/s sequential, {pipe:,.0f} rows/s with {cfg.concurrency} in flight"
        )
    return result


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(r: dict) -> str:
    return f"in-process {r['inprocess_rows_per_s']:,.0f} rows/s; " + "; ".join(
        f"{k.removeprefix('group_').replace('_rows_per_s', '')} {v:,.0f} rows/s"
        for k, v in r.items()
        if k.startswith("group_")
    )
