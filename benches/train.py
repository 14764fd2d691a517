"""`exfm bench train`: one tenant's training in a plain in-process loop vs in Ray Train, and two
tenants at once vs one, in one run on the same machine.

Arms, interleaved window by window (in reverse order on odd windows):
- plain: the driver trains window t in this process;
- bare pair: the same loop in two plain processes at once, no Ray: what this machine itself gives
  two CPU-bound trainers (`machine_scaling` = their rows/s over the plain loop's), the ceiling the
  Ray figure is read against;
- one tenant: run A alone trains window t in Ray Train while run B waits;
- two tenants: runs A and B train window t at once.
This machine's speed drifts by +-30% over seconds to minutes (a 1-thread matmul loop: 1445-1848
iterations per 0.5 s within 10 s), so arms measured minutes apart (the first version of this
bench: whole arms in alternating rounds) compared the drift more than the arms; seconds apart, in
both orders, they see much the same machine, and the median of the per-window ratios shrugs off
the odd spike.

Both Ray runs stay alive for the whole bench, so the one-tenant and two-tenant windows run on the
same node with the same Ray processes: the difference between them is the second tenant's work,
not a third run idling (an idle Ray Train run is ~9 Python processes at ~1% of a core each).
Run A follows its own store, into which the bench commits every window twice (once for each
phase, in the order the phases come); run B follows a store holding each window once.

Every arm runs the same TenantRun over the same augmented windows with one torch thread. A plain
window's time is its read plus `TenantRun.window`; a Ray window's time runs from the commit of the
window to the moment the run waits for the next one (or ends), so it also holds the run's poll,
its read, the report with the checkpoint, the metrics file and the published student. Start-up
(fit() until the runs wait for their first window) is reported on its own (`ray_startup_s`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from pydantic import Field

from actors.remote import fit_tenant_task
from exfm_ray.configbase import Config
from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.config import FMConfig
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.registry import TenantRegistry
from exfm_ray.tenants.run import TenantRun
from exfm_ray.tenants.trainer import TenantRunConfig, WindowPlan

# Logical CPUs a local bench cluster needs: two Ray Train runs of one worker each.
BENCH_CPUS = 2
# A window takes seconds; a run silent for this long is stuck, and the bench says so instead of hanging.
WAIT_LIMIT_S = 600


class TrainBenchConfig(Config):
    rows_per_window: int = Field(60_000, ge=1000, description="Synthetic examples per window.")
    windows: int = Field(8, ge=2, description="Windows each arm trains on, interleaved window by window.")


def run(cfg: TrainBenchConfig, log=print) -> dict:
    rows_per_window, windows = cfg.rows_per_window, cfg.windows
    work = Path(tempfile.mkdtemp(prefix="exfm-bench-train-"))
    bare = ray_runs = None
    try:
        stream = SyntheticStream(SyntheticConfig(num_windows=windows, rows_per_window=rows_per_window)).stream()
        augment_stream_locally(stream, work / "source", FMConfig(size=2))
        source = AugmentedStore(work / "source")
        # Guard off: this bench compares ways of running one training loop; the guard's twin has
        # its own bench (exfm bench guard).
        tenant = TenantConfig(name="feed", guard=False)
        twin = TenantConfig(name="feed_twin", rows=["feed"], seed=1, guard=False)
        plain = TenantRun(resolve(tenant, source.spec()))
        bare = _BarePair(source, [tenant, twin])
        ray_runs = _RayRuns(source, work, tenant, twin, windows)
        arms = {"plain": lambda t: _train_window(plain, source, t), "bare_pair": bare.window,
                "one_tenant": ray_runs.one, "two_tenants": ray_runs.two}  # fmt: skip
        per_window = []
        for t in range(windows):
            order = list(arms) if t % 2 == 0 else list(reversed(arms))  # a drift within a window cancels
            got = {name: arms[name](t) for name in order}
            per_window.append({"window": t, **{name: got[name] for name in arms}})
            p, b, o, w = (got[k] for k in arms)
            log(
                f"window {t}: plain {p['rows_per_s']:,.0f} rows/s | Ray Train {o['rows_per_s']:,.0f} "
                f"(ratio {o['rows_per_s'] / p['rows_per_s']:.2f}) | 2 tenants {w['rows_per_s']:,.0f} "
                f"(scaling {w['rows_per_s'] / o['rows_per_s']:.2f}) | 2 bare processes {b['rows_per_s']:,.0f} "
                f"(machine scaling {b['rows_per_s'] / p['rows_per_s']:.2f})"
            )
        ray_runs.finish()
        rate = {arm: _total(per_window, arm) for arm in arms}
        ratios = [w["one_tenant"]["rows_per_s"] / w["plain"]["rows_per_s"] for w in per_window]
        scalings = [w["two_tenants"]["rows_per_s"] / w["one_tenant"]["rows_per_s"] for w in per_window]
        return {
            "plain_rows_per_s": rate["plain"],
            "ray_rows_per_s": rate["one_tenant"],
            "ratio": rate["one_tenant"] / rate["plain"],
            "one_tenant_rows_per_s": rate["one_tenant"],
            "two_tenants_rows_per_s": rate["two_tenants"],
            "scaling": rate["two_tenants"] / rate["one_tenant"],
            "ratio_median_window": statistics.median(ratios),
            "scaling_median_window": statistics.median(scalings),
            "bare_pair_rows_per_s": rate["bare_pair"],
            "machine_scaling": rate["bare_pair"] / rate["plain"],
            "ray_startup_s": ray_runs.startup_s,
            "rows_per_tenant": sum(w["plain"]["rows"] for w in per_window),
            "windows": windows,
            "rows_per_window": rows_per_window,
            "torch_threads": 1,
            "per_window": per_window,
        }
    finally:
        if bare is not None:
            bare.close()
        shutil.rmtree(work, ignore_errors=True)


def _total(per_window: list[dict], arm: str) -> float:
    return sum(w[arm]["rows"] for w in per_window) / sum(w[arm]["seconds"] for w in per_window)


def _figures(rows: int, seconds: float, train_s: float, began: float) -> dict:
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "train_s": train_s, "began": began}


def _train_window(run: TenantRun, source: AugmentedStore, t: int) -> dict:
    """One plain window (the plain arm and each bare process): read plus TenantRun.window, with one
    torch thread as each Ray Train worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        began = time.time()
        record = run.window(t, source.read_window(t, columns=run.view.columns))
        return _figures(record["rows"], time.time() - began, record["train_s"], began)
    finally:
        torch.set_num_threads(threads)


def _bare_worker(conn, source_root: str, tenant: dict) -> None:
    """A plain process of the bare pair: trains the windows it is sent, one at a time."""
    source = AugmentedStore(source_root)
    run = TenantRun(resolve(TenantConfig.model_validate(tenant), source.spec()))
    conn.send("ready")
    while (t := conn.recv()) is not None:
        conn.send(_train_window(run, source, t))


class _BarePair:
    """Two spawned processes (not forked: this process holds Ray's threads) training side by side."""

    def __init__(self, source: AugmentedStore, tenants: list[TenantConfig]):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for tenant in tenants:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_bare_worker, args=(theirs, str(source.root.parent), tenant.model_dump()))
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)
        for conn in self.conns:
            if conn.recv() != "ready":
                raise RuntimeError("a bare bench process failed to start")

    def window(self, t: int) -> dict:
        began = time.time()
        for conn in self.conns:
            conn.send(t)
        got = [conn.recv() for conn in self.conns]
        return _figures(sum(g["rows"] for g in got), time.time() - began, max(g["train_s"] for g in got), began)

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            with contextlib.suppress(OSError):  # the process may be gone already
                conn.send(None)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


class _RayRuns:
    """Runs A and B in follow mode, each on its own storage; the bench commits windows and waits.

    A window is staged (its Parquet copied into the run's store) before the clock starts: the
    timed part is the commit and the run's work on it, as when the DAS commits a window."""

    def __init__(self, source: AugmentedStore, work: Path, a: TenantConfig, b: TenantConfig, windows: int):
        self.a = _FollowedRun(source, work / "run_a", a, last_window=2 * windows - 1)
        self.b = _FollowedRun(source, work / "run_b", b, last_window=windows - 1)
        self.a_next = 0
        launched = time.time()
        self._wait(self.a, 0)
        self._wait(self.b, 0)
        self.startup_s = time.time() - launched

    def one(self, t: int) -> dict:
        return self._measure([(self.a, self._next_a(), t)])

    def two(self, t: int) -> dict:
        return self._measure([(self.a, self._next_a(), t), (self.b, t, t)])

    def _next_a(self) -> int:
        """Run A trains every window twice (once per phase), in the order the phases come."""
        a, self.a_next = self.a_next, self.a_next + 1
        return a

    def finish(self) -> None:
        ray.get([self.a.ref, self.b.ref])

    def _measure(self, trained: list[tuple[_FollowedRun, int, int]]) -> dict:
        """trained: (run, its window index, source window) for each run working in this phase."""
        commits = [run.stage(t, as_window=w) for run, w, t in trained]
        began = time.time()
        for commit in commits:
            commit()
        for run, w, _ in trained:
            self._wait(run, w + 1)
        seconds = time.time() - began
        records = [run.record(w) for run, w, _ in trained]
        # train_s: the slowest run's training pass alone, to tell compute from per-window overhead
        return _figures(sum(r["rows"] for r in records), seconds, max(r["train_s"] for r in records), began)

    def _wait(self, run: _FollowedRun, t: int) -> None:
        """Until the run waits for its window t (or, past its last window, has ended)."""
        checked = began = time.time()
        while not run.idle(t):
            if time.time() - began > WAIT_LIMIT_S:
                raise RuntimeError(f"tenant run {run.tenant.name} did not finish window {t - 1} in {WAIT_LIMIT_S} s")
            time.sleep(0.005)  # polls cost the students' CPU: sleep between stats of progress.json
            if time.time() - checked > 0.5:
                checked = time.time()
                finished, _ = ray.wait([run.ref], timeout=0)
                if finished and not run.idle(t):  # the run ended early: surface its error
                    ray.get(finished)
                    raise RuntimeError("a tenant run ended before its windows were committed")


class _FollowedRun:
    def __init__(self, source: AugmentedStore, storage: Path, tenant: TenantConfig, last_window: int):
        self.source, self.tenant = source, tenant
        self.spec, self.records = source.spec(), source.records()
        self.registry = TenantRegistry(storage)
        self.store = AugmentedStore(storage)
        self.store.declare_spec(self.spec)  # the run builds its student before the first window
        self.last_window = last_window
        self.progress = self.registry.progress_path(tenant.name)
        self._seen: tuple[int, int] | None = None
        self._progress: dict = {}
        entry = self.registry.add(tenant)
        plan = WindowPlan(last_window=last_window, follow=True)
        run_cfg = TenantRunConfig(storage=str(storage), lead=entry, plan=plan, poll_s=0.05)
        self.ref = fit_tenant_task().remote(run_cfg)

    def stage(self, t: int, *, as_window: int) -> Callable[[], None]:
        """Copy source window t into this run's staging area; the returned call commits it."""
        staged = self.store.staging_dir(f"bench{as_window}") / f"window={as_window}"
        shutil.copytree(self.source.window_dir(t), staged)
        record = self.records[t].model_copy(update={"window": as_window})
        return lambda: self.store.commit(as_window, staged, record, self.spec)

    def record(self, window: int) -> dict:
        history = self.registry.history(self.tenant.name)
        return next(r for r in history if r["window"] == window)

    def idle(self, t: int) -> bool:
        p = self._read_progress()
        if t > self.last_window:
            return p.get("phase") == "done"
        return p.get("phase") == "waiting" and p.get("window") == t

    def _read_progress(self) -> dict:
        """progress.json, parsed again only when replaced (the run writes it atomically)."""
        try:
            st = os.stat(self.progress)
        except FileNotFoundError:
            return {}
        if (st.st_ino, st.st_mtime_ns) != self._seen:
            self._progress = self.registry.read_json(self.progress) or {}
            self._seen = (st.st_ino, st.st_mtime_ns)
        return self._progress


def summary(r: dict) -> str:
    return (
        "| plain loop | Ray Train | ratio | median window ratio | 1 tenant | 2 tenants | scaling | "
        "2 bare processes | machine scaling |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {r['plain_rows_per_s']:,.0f} rows/s | {r['ray_rows_per_s']:,.0f} rows/s | {r['ratio']:.2f} | "
        f"{r['ratio_median_window']:.2f} | {r['one_tenant_rows_per_s']:,.0f} rows/s | "
        f"{r['two_tenants_rows_per_s']:,.0f} rows/s | {r['scaling']:.2f} | "
        f"{r['bare_pair_rows_per_s']:,.0f} rows/s | {r['machine_scaling']:.2f} |"
    )
