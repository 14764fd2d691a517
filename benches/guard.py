"""`exfm bench guard`: what the do-no-harm guard's twin costs a tenant.

The guard trains a second student (the control, no FM) on every batch the ExFM student trains
on, and scores both plus a constant on every window. Both arms run the one tenant loop
(`TenantRun`) in this process on the same augmented windows, one torch thread each, alternating
window by window (the order flips every window, so a drift of the machine cancels).
Memory is counted exactly: bytes of every tensor a run's checkpoint holds (weights, optimizer
state) — what a trainer keeps resident for the tenant beyond the window's rows, and what each
checkpoint writes.
Serving: when the guard publishes its blend, one request runs both students. The bench times the
forward pass of the blend against the ExFM student alone on the last window's rows (alternating,
one batch each in turn) and counts the bytes of each serving checkpoint.
"""

from __future__ import annotations

import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.config import FMConfig
from exfm_ray.students.model import BlendServing
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.run import TenantRun


class GuardBenchConfig(Config):
    windows: int = Field(6, ge=2, description="Windows each arm trains on, interleaved window by window.")
    rows_per_window: int = Field(40_000, ge=1000, description="Synthetic examples per window.")
    variant: str = Field("kd_sa", description="The ExFM student's variant.")


def run(cfg: GuardBenchConfig, log=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="exfm-bench-guard-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stream = SyntheticStream(SyntheticConfig(num_windows=cfg.windows, rows_per_window=cfg.rows_per_window)).stream()
        augment_stream_locally(stream, work, FMConfig(size=2))
        store = AugmentedStore(work)
        arms = {
            guard: TenantRun(resolve(TenantConfig(name="feed", variant=cfg.variant, guard=guard), store.spec()))
            for guard in (False, True)
        }
        per_window = []
        for t in range(cfg.windows):
            table = store.read_window(t, columns=arms[True].view.columns)
            got = {}
            for guard in (False, True) if t % 2 == 0 else (True, False):
                began = time.perf_counter()
                record = arms[guard].window(t, table)
                got[guard] = {"rows": record["rows"], "seconds": time.perf_counter() - began}
            per_window.append({"window": t, "alone": got[False], "guarded": got[True]})
            ratio = _rate(got[True]) / _rate(got[False])
            log(f"window {t}: guard off {_rate(got[False]):,.0f} rows/s | on {_rate(got[True]):,.0f} ({ratio:.2f})")
        off, on = (sum(w[k]["rows"] for w in per_window) / sum(w[k]["seconds"] for w in per_window)
                   for k in ("alone", "guarded"))  # fmt: skip
        state_off, state_on = (_state_bytes(arms[g]) for g in (False, True))
        serving = _serving_cost(arms[True], table)
        log(f"serving the blend: forward {serving['blend_forward_ratio']:.2f}x the ExFM student's, "
            f"checkpoint {serving['blend_bytes_ratio']:.2f}x")  # fmt: skip
        return {
            "variant": cfg.variant,
            "windows": cfg.windows,
            "rows_per_window": cfg.rows_per_window,
            "guard_off_rows_per_s": off,
            "guard_on_rows_per_s": on,
            "rows_per_s_ratio": on / off,
            "ratio_median_window": statistics.median(_rate(w["guarded"]) / _rate(w["alone"]) for w in per_window),
            "state_bytes_guard_off": state_off,
            "state_bytes_guard_on": state_on,
            "state_ratio": state_on / state_off,
            **serving,
            "torch_threads": 1,
            "per_window": per_window,
        }
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)


def _serving_cost(run: TenantRun, table, batch_rows: int = 512, reps: int = 30) -> dict:
    """Forward time (median of paired ratios) and serving-checkpoint bytes: the blend vs the ExFM student."""
    alone = run.learner.model.serving_model().eval()
    blend = BlendServing(alone, run.control.model.serving_model()).eval()
    rows = WindowTensors(run.view.select(table), run.view.spec)
    batch = rows.batch(0, min(batch_rows, rows.num_rows), run.features, run.dense)
    ratios = []
    pair = [("alone", alone), ("blend", blend)]
    with torch.inference_mode():
        for i in range(reps):
            took = {}
            for name, model in pair if i % 2 == 0 else pair[::-1]:
                began = time.perf_counter()
                model(batch.sparse, batch.dense)
                took[name] = time.perf_counter() - began
            ratios.append(took["blend"] / took["alone"])
    sizes = {name: _bytes(m.state_dict()) for name, m in (("alone", alone), ("blend", blend))}
    return {
        "blend_forward_ratio": statistics.median(ratios),
        "serving_bytes_exfm": sizes["alone"],
        "serving_bytes_blend": sizes["blend"],
        "blend_bytes_ratio": sizes["blend"] / sizes["alone"],
    }


def _bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def _rate(arm: dict) -> float:
    return arm["rows"] / arm["seconds"]


def _state_bytes(run: TenantRun) -> int:
    """Bytes of a checkpoint of the run (weights and optimizer state of every student it trains)."""
    return _bytes(run.state_dict())


def summary(r: dict) -> str:
    return (
        f"guard off {r['guard_off_rows_per_s']:,.0f} rows/s | guard on {r['guard_on_rows_per_s']:,.0f} rows/s | "
        f"ratio {r['rows_per_s_ratio']:.2f} (median window {r['ratio_median_window']:.2f}) | checkpoint "
        f"{r['state_bytes_guard_off'] / 1e6:.2f} -> {r['state_bytes_guard_on'] / 1e6:.2f} MB "
        f"({r['state_ratio']:.2f}x) | "
        f"serving the blend: forward {r['blend_forward_ratio']:.2f}x, checkpoint {r['blend_bytes_ratio']:.2f}x"
    )
