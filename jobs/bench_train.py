"""`exfm bench train`: one tenant's training in a plain in-process loop vs in Ray Train, and two
tenants at once vs one, in one run on the same machine.

The arms are interleaved window by window: the plain loop trains window t in this process,
window t is committed to the one-tenant Ray run and to the two-tenant Ray runs, each waited on
until it is idle again, before window t+1 (in reverse order on odd windows). This machine's speed
drifts by +-30% over seconds to minutes (a 1-thread matmul loop: 1445-1848 iterations per 0.5 s
within 10 s), so arms measured minutes apart (the first version of this bench: whole arms in
alternating rounds) compared the drift more than the arms; seconds apart, in both orders, they
see much the same machine, and the median of the per-window ratios shrugs off the odd spike.

Every arm runs the same TenantRun over the same augmented windows with one torch thread. A plain
window's time is its read plus `TenantRun.window`; a Ray window's time runs from the commit of the
window to the moment the run waits for the next one (or ends), so it also holds the run's poll,
its read, the report with the checkpoint, the metrics file and the published student. Start-up
(fit() until the run waits for its first window) is reported on its own (`ray_startup_s`).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from actors.launch import fit_tenant_task
from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.errors import ExfmError
from exfm_ray.fm.config import FMConfig
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.registry import TenantRegistry
from exfm_ray.tenants.run import TenantRun
from exfm_ray.tenants.trainer import TenantRunConfig

# Logical CPUs a local bench cluster needs: three Ray Train runs (1 + 2 tenants) stay alive for
# the whole bench, but only one arm works at a time.
BENCH_CPUS = 4


def run_train_bench(*, rows_per_window: int, windows: int, log=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="exfm-bench-train-"))
    try:
        stream = SyntheticStream(SyntheticConfig(num_windows=windows, rows_per_window=rows_per_window)).stream()
        augment_stream_locally(stream, work / "source", FMConfig(size=2))
        source = AugmentedStore(work / "source")
        tenant = TenantConfig(name="feed")
        plain = _PlainArm(source, tenant)
        one = _RayArm(source, work / "one", [tenant], windows)
        two = _RayArm(source, work / "two", [tenant, TenantConfig(name="feed_twin", rows=["feed"], seed=1)], windows)
        per_window = []
        for t in range(windows):
            arms = {"plain": plain, "one": one, "two": two}
            order = list(arms) if t % 2 == 0 else list(reversed(arms))  # a drift within a window cancels
            got = {name: arms[name].window(t) for name in order}
            p, o, w = got["plain"], got["one"], got["two"]
            per_window.append({"window": t, "plain": p, "one_tenant": o, "two_tenants": w})
            log(
                f"window {t}: plain {p['rows_per_s']:,.0f} rows/s | Ray Train {o['rows_per_s']:,.0f} rows/s "
                f"(ratio {o['rows_per_s'] / p['rows_per_s']:.2f}) | 2 tenants {w['rows_per_s']:,.0f} rows/s "
                f"(scaling {w['rows_per_s'] / o['rows_per_s']:.2f}) | s total/training: plain "
                f"{p['seconds']:.2f}/{p['train_s']:.2f}, Ray {o['seconds']:.2f}/{o['train_s']:.2f}, "
                f"2 tenants {w['seconds']:.2f}/{w['train_s']:.2f}"
            )
        one.finish()
        two.finish()
        rate = {arm: _total(per_window, arm) for arm in ("plain", "one_tenant", "two_tenants")}
        ratios = list(w["one_tenant"]["rows_per_s"] / w["plain"]["rows_per_s"] for w in per_window)
        return {
            "plain_rows_per_s": rate["plain"],
            "ray_rows_per_s": rate["one_tenant"],
            "ratio": rate["one_tenant"] / rate["plain"],
            "one_tenant_rows_per_s": rate["one_tenant"],
            "two_tenants_rows_per_s": rate["two_tenants"],
            "scaling": rate["two_tenants"] / rate["one_tenant"],
            "ratio_median_window": statistics.median(ratios),
            "ray_startup_s": one.startup_s,
            "rows_per_tenant": sum(w["plain"]["rows"] for w in per_window),
            "windows": windows,
            "rows_per_window": rows_per_window,
            "torch_threads": 1,
            "per_window": per_window,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _total(per_window: list[dict], arm: str) -> float:
    return sum(w[arm]["rows"] for w in per_window) / sum(w[arm]["seconds"] for w in per_window)


class _PlainArm:
    def __init__(self, source: AugmentedStore, tenant: TenantConfig):
        self.source = source
        self.view = resolve(tenant, source.spec())
        self.run = TenantRun(self.view)

    def window(self, t: int) -> dict:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each Ray Train worker
        try:
            began = time.time()
            record = self.run.window(t, self.source.read_window(t, columns=self.view.columns))
            seconds = time.time() - began
        finally:
            torch.set_num_threads(threads)
        return {"rows": record["rows"], "seconds": seconds, "rows_per_s": record["rows"] / seconds,
                "train_s": record["train_s"]}  # fmt: skip


class _RayArm:
    """Tenant runs in follow mode on their own storage; the bench commits a window and waits."""

    def __init__(self, source: AugmentedStore, storage: Path, tenants: list[TenantConfig], windows: int, poll_s=0.05):
        self.source, self.storage, self.tenants, self.windows = source, storage, tenants, windows
        self.registry = TenantRegistry(storage)
        self.store = AugmentedStore(storage)
        self.store.declare_spec(source.spec())  # the runs build their students before the first window
        entries = [self.registry.add(t) for t in tenants]
        launched = time.time()
        self.refs = [
            fit_tenant_task().remote(
                TenantRunConfig(storage=str(storage), entry=e, last_window=windows - 1, follow=True, poll_s=poll_s)
            )  # fmt: skip
            for e in entries
        ]
        self._wait_idle(0)
        self.startup_s = time.time() - launched

    def window(self, t: int) -> dict:
        staged = self.store.staging_dir(f"bench{t}") / f"window={t}"
        shutil.copytree(self.source.window_dir(t), staged)
        began = time.time()
        self.store.commit(t, staged, self.source.records()[t], self.source.spec())
        self._wait_idle(t + 1)
        seconds = time.time() - began
        records = []
        for tenant in self.tenants:
            history = self.registry.read_json(self.registry.metrics_path(tenant.name))
            records.append(next(r for r in history if r["window"] == t))
        rows = sum(r["rows"] for r in records)
        # train_s: the slowest run's training pass alone, to tell compute from per-window overhead
        return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
                "train_s": max(r["train_s"] for r in records)}  # fmt: skip

    def finish(self) -> None:
        ray.get(self.refs)

    def _wait_idle(self, t: int) -> None:
        """Until every run waits for window t (or, past the last window, has ended)."""
        while not all(self._idle(tenant.name, t) for tenant in self.tenants):
            finished, _ = ray.wait(self.refs, timeout=0.01)
            if finished and t < self.windows:  # a run ended early: surface its error
                ray.get(finished)
                raise ExfmError("a tenant run ended before its windows were committed")

    def _idle(self, name: str, t: int) -> bool:
        p = self.registry.read_json(self.registry.progress_path(name)) or {}
        if t >= self.windows:
            return p.get("phase") == "done"
        return p.get("phase") == "waiting" and p.get("window") == t
