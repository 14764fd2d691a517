"""`exfm bench tenants`: what each tenant costs a running system as tenants are added (issue 16).

One run that grows. A synthetic stream is augmented once; a tenant manager follows a fresh
storage root with no end (as `exfm run` does) and the bench plays the DAS, committing one window
per step. First a baseline: the manager alone, no tenant. Then for each count, tenants are added
through `exfm tenants add` (the running manager starts their runs), the new ones catch up on every
committed window, the next window is committed, and the bench times per tenant the commit to the
student it publishes for that window. When every tenant has published, the system is left alone
and its idle cost sampled: memory and CPU of every process under this driver, which is the local
Ray `exfm bench` starts (GCS, raylet, workers). Minus the baseline, over the count: per tenant.
Last, with the runs stopped, `exfm bench serve` serves the students they published (every tenant
asked in turn: routing, models held per replica, p99 against one tenant).

Idle is what grows with tenants: a following run keeps its Ray Train processes between windows,
and a day holds far more idle time than training. Memory is PSS with RSS beside it (Ray workers map
the same libraries; RSS counts a shared page once per process). CPU is utime+stime of the
processes alive at the end of the interval. The driver, which reads /proc, is left out.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import yaml
from pydantic import Field, PositiveInt

from actors.launch import start_tenant_manager
from actors.tenant_manager import TenantManagerConfig
from exfm_ray.bench import figures
from exfm_ray.bench.proc_tree import MB, idle_cost, sample_tree
from exfm_ray.configbase import Config
from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.config import FMConfig
from exfm_ray.students.store import StudentStore
from exfm_ray.tenants.config import TenantConfig
from exfm_ray.tenants.registry import TenantRegistry

SAMPLE_S = 0.5  # peak memory is sampled this often while tenants train
PER_TENANT = ("idle_rss_mb_per_tenant", "idle_pss_mb_per_tenant", "idle_cpu_share_per_tenant")


class TenantsBenchConfig(Config):
    counts: list[PositiveInt] = Field([1, 2, 4, 8, 16, 32], min_length=1, description="Tenant counts, in one run.")
    rows_per_window: int = Field(3000, ge=100, description="Synthetic examples per window (all stream tenants).")
    stream_tenants: int = Field(3, ge=1, le=8, description="Stream tenants; the bench's tenants read them in turn.")
    max_concurrent: int = Field(4, ge=1, description="Tenant runs holding resources at once (the manager's).")
    tenants_per_run: int | None = Field(None, ge=1, description="Small tenants sharing one run; None: the manager's.")
    settle_seconds: float = Field(5.0, ge=0, description="Wait after the last publish before idle sampling.")
    idle_seconds: float = Field(10.0, gt=0, description="Interval over which idle memory and CPU are sampled.")
    timeout_s: float = Field(900.0, gt=0, description="Longest wait for the tenants to publish one window.")
    serve: bool = Field(True, description="Also serve the largest count with `exfm bench serve` at the end.")
    serve_replicas: int = Field(2, ge=1, description="Serve replicas for the Serve part.")
    plot: Path | None = Field(Path("runs/bench/tenants.png"), description="PNG of the curve; None: no plot.")


def per_tenant(idle: dict, baseline: dict, tenants: int) -> dict:
    """What the tenants add over the manager alone, each; CPU as a share of one core."""
    over = [(idle[k] - baseline[k]) / tenants for k in ("rss_mb", "pss_mb", "cpu_share")]
    return dict(zip(PER_TENANT, over, strict=True))


def run(cfg: TenantsBenchConfig, log=print, cli: Callable[[list[str]], int] | None = None) -> dict:
    """On the local Ray this process started. cli: `exfm <argv>` in this process (jobs/ passes it:
    benches cannot import jobs); None adds tenants through the manager, the call the CLI makes."""
    counts = sorted(set(cfg.counts))
    work = Path(tempfile.mkdtemp(prefix="exfm-bench-tenants-"))
    system = None
    try:
        stream = SyntheticStream(SyntheticConfig(num_windows=len(counts) + 1, rows_per_window=cfg.rows_per_window,
                                                 num_tenants=cfg.stream_tenants)).stream()  # fmt: skip
        augment_stream_locally(stream, work / "source", FMConfig(size=2))
        system = _System(cfg, AugmentedStore(work / "source"), work, cli)
        # A tenant added before train() has begun is registered but not started until the next window.
        _wait_until(lambda: ray.get(system.manager.status.remote())["training"], 120, "the manager to start training")
        baseline = system.idle()
        if baseline["processes"] == 0:
            raise RuntimeError("no process under this driver: the bench measures a local Ray it starts "
                               "(unset EXFM_RAY_ADDRESS / RAY_ADDRESS)")  # fmt: skip
        log(f"baseline (manager, no tenant): {_line(baseline)}")
        curve = [system.step(t, count, baseline, log) for t, count in enumerate(counts, start=1)]
        every_window = system.trained_every_window()
        ray.get(system.manager.stop.remote())  # its runs end and give their CPUs back to Serve
        ray.kill(system.manager)
        system.manager = None
        try:
            serve = _serve(cfg, counts[-1], system.storage, log) if cfg.serve else {}
        except Exception as exc:  # keep the tenants' figures, which took most of the run
            log(f"Serve part failed: {exc!r}")
            serve = {"error": repr(exc)}
        result = {
            "max_tenants": counts[-1], "all_trained_every_window": every_window,
            **{k: curve[-1][k] for k in PER_TENANT},  # at the largest count
            **{k: serve.get(k) for k in ("serve_p99_ratio", "max_models_per_replica")},
            "tenants_served": len(serve.get("tenants", [])),  # each answered 200 (benches/serve.py checks)
            "baseline": {"idle_rss_mb_total": baseline["rss_mb"], "idle_pss_mb_total": baseline["pss_mb"],
                         "idle_cpu_share": baseline["cpu_share"], "ray_processes": baseline["processes"]},
            "curve": curve, "max_concurrent": cfg.max_concurrent, "tenants_per_run": cfg.tenants_per_run,
            "rows_per_window": cfg.rows_per_window, "serve": serve,
        }  # fmt: skip
        if cfg.plot is not None:
            result["plot"] = str(plot(result, cfg.plot))
        return result
    finally:
        if system is not None and system.manager is not None:
            ray.kill(system.manager)
        shutil.rmtree(work, ignore_errors=True)


class _System:
    """The running system the bench grows: a storage root, its manager, the tenants added so far."""

    def __init__(self, cfg: TenantsBenchConfig, source: AugmentedStore, work: Path, cli):
        self.cfg, self.source, self.cli = cfg, source, cli
        self.storage, self.yamls, self.names, self.peak = work / "storage", work / "tenants", [], (0, 0)
        self.yamls.mkdir()
        self.store, self.registry = StudentStore(self.storage), TenantRegistry(self.storage)
        self.commit(0)  # the CLI checks a tenant against the stream's spec, committed with a window
        fields = {"storage": str(self.storage), "max_concurrent": cfg.max_concurrent, "poll_s": 0.5}
        if cfg.tenants_per_run is not None:  # unset: whatever the manager defaults to, with or without the field
            fields["tenants_per_run"] = cfg.tenants_per_run
        self.manager = start_tenant_manager(TenantManagerConfig.parse(fields, source="exfm bench tenants"))
        self.following = self.manager.train.remote(0, None, True)

    def commit(self, t: int) -> float:
        """What the DAS does when it finishes window t; returns the moment the window became visible."""
        store = AugmentedStore(self.storage)
        staged = store.staging_dir(f"copy{t}") / f"window={t}"
        shutil.copytree(self.source.window_dir(t), staged)
        began = time.time()
        store.commit(t, staged, self.source.records()[t], self.source.spec())
        self.last_window = t
        return began

    def step(self, t: int, count: int, baseline: dict, log) -> dict:
        new = [f"t{i:02d}" for i in range(len(self.names), count)]
        added = time.time()
        for name in new:
            self._add(name, len(self.names))
            self.names.append(name)
        self.peak = (0, 0)
        caught_up = self._wait(new, t - 1)
        catch_up_s = max(caught_up.values(), default=added) - added
        committed = self.commit(t)
        published = self._wait(self.names, t)
        latency = [published[n] - committed for n in self.names]
        rows = sum(next(r["rows"] for r in self.registry.history(n) if r["window"] == t) for n in self.names)
        idle = self.idle()
        groups = ray.get(self.manager.status.remote()).get("groups")  # runs hosting tenants (shared runs)
        entry = {
            "tenants": count, "window": t, "idle_rss_mb_total": idle["rss_mb"], "idle_pss_mb_total": idle["pss_mb"],
            "idle_cpu_share_total": idle["cpu_share"], **per_tenant(idle, baseline, count),
            "peak_rss_mb_total": self.peak[0] / MB, "peak_pss_mb_total": self.peak[1] / MB,
            "commit_to_publish_s": {"median": statistics.median(latency), "max": max(latency)},
            "catch_up_s": catch_up_s if new else 0.0, "rows_per_s": rows / max(latency),
            "ray_processes": idle["processes"], "train_runs": None if groups is None else len(groups),
        }  # fmt: skip
        log(f"{count} tenants (window {t}): commit->publish median {statistics.median(latency):.1f} s, "
            f"max {max(latency):.1f} s; new tenants caught up in {entry['catch_up_s']:.1f} s; "
            f"{entry['rows_per_s']:,.0f} rows/s; idle {_line(idle)}")  # fmt: skip
        return entry

    def _add(self, name: str, i: int) -> None:
        """Each tenant reads one stream tenant in turn, with its own seed: as many distinct students."""
        cfg = {"rows": [self.source.spec().tenant_names[i % self.cfg.stream_tenants]],
               "student": {"size": 1}, "guard": False, "seed": i}  # fmt: skip
        if self.cli is None:
            ray.get(self.manager.add.remote(TenantConfig.parse({**cfg, "name": name}).model_dump(mode="json")))
            return
        path = self.yamls / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        address = ray.get_runtime_context().gcs_address
        argv = ["tenants", "add", name, "--config", str(path), "--storage", str(self.storage), "--address", address]
        if self.cli(argv) != 0:
            raise RuntimeError(f"exfm {' '.join(argv)} failed")

    def _wait(self, names: list[str], t: int) -> dict[str, float]:
        """Until each tenant has published its student for window t: when each did (unix s)."""
        pending, got, seen = set(names), {}, {}
        began = checked = time.monotonic()
        while pending:
            sample = sample_tree()
            self.peak = (max(self.peak[0], sample.rss_kb), max(self.peak[1], sample.pss_kb))
            for name in sorted(pending):
                pub = self.store.latest(name)
                if pub is None or seen.get(name) == pub.version:
                    continue  # meta.json is read once per version
                seen[name] = pub.version
                meta = self.store.latest_meta(name)
                if meta is not None and meta.window >= t:
                    got[name] = pub.published_at  # t is the last window committed: this is its student
                    pending.discard(name)
            if not pending:
                break
            if time.monotonic() - began > self.cfg.timeout_s:
                behind = {n: [r["window"] for r in self.registry.history(n)][-1:] for n in sorted(pending)}
                raise RuntimeError(f"tenants did not publish window {t} in {self.cfg.timeout_s:.0f} s "
                                   f"(last window trained: {behind})")  # fmt: skip
            if time.monotonic() - checked > 2.0:
                checked = time.monotonic()
                self._check(pending)
            time.sleep(SAMPLE_S)
        return got

    def _check(self, pending: set[str]) -> None:
        """A failed run or a manager that stopped following: say so now, not at the timeout."""
        done, _ = ray.wait([self.following], timeout=0)
        if done:
            ray.get(done[0])
            raise RuntimeError("the tenant manager stopped following the stream")
        runs = ray.get(self.manager.status.remote())["runs"]
        failed = {n: runs[n].get("error") for n in pending if runs.get(n, {}).get("status") == "failed"}
        if failed:
            raise RuntimeError(f"tenant runs failed: {failed}")

    def idle(self) -> dict:
        time.sleep(self.cfg.settle_seconds)
        samples = [sample_tree()]
        end = time.monotonic() + self.cfg.idle_seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            samples.append(sample_tree())
        return idle_cost(samples)

    def trained_every_window(self) -> bool:
        """Every tenant trained each committed window exactly once, in order (late ones caught up)."""
        want = list(range(self.last_window + 1))
        return all([r["window"] for r in self.registry.history(n)] == want for n in self.names)


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def _serve(cfg: TenantsBenchConfig, tenants: int, storage: Path, log) -> dict:
    """`exfm bench serve` over the students the tenants published, on the same Ray, once the tenant
    runs have let go of their CPUs: every tenant is asked in turn, so each one is served."""
    from benches.serve import ServeBenchConfig
    from benches.serve import run as serve_run
    from exfm_ray.serving.config import ServeConfig

    total = ray.cluster_resources().get("CPU", 0)
    _wait_until(lambda: ray.available_resources().get("CPU", 0) >= total - 1e-6, 120, "the tenant runs to end")
    # As docs/benchmarks.md measured routing: 2 half-CPU replicas; store_root and port are replaced.
    app = ServeConfig(store_root=Path("."), num_replicas=cfg.serve_replicas, replica_cpus=0.5)
    log(f"serving {tenants} tenants on {cfg.serve_replicas} replicas")
    got = serve_run(ServeBenchConfig(tenants=tenants, requests=2000, seconds=5.0, serve=app, store_root=storage))
    log(f"Serve: p99 ratio {got['serve_p99_ratio']}, most models on a replica {got['max_models_per_replica']}")
    return got


def _line(i: dict) -> str:
    return (f"PSS {i['pss_mb']:,.0f} MB, RSS {i['rss_mb']:,.0f} MB, {i['cpu_share']:.1%} of a core, "
            f"{i['processes']} processes")  # fmt: skip


def plot(r: dict, path: Path) -> Path:
    curve, x = r["curve"], [c["tenants"] for c in r["curve"]]
    fig, axes = figures.pyplot().subplots(1, 3, figsize=(14, 4))
    axes[0].plot(x, [c["idle_pss_mb_per_tenant"] for c in curve], "o-", label="PSS")
    axes[0].plot(x, [c["idle_rss_mb_per_tenant"] for c in curve], "s--", label="RSS")
    axes[1].plot(x, [100 * c["idle_cpu_share_per_tenant"] for c in curve], "o-")
    axes[2].plot(x, [c["commit_to_publish_s"]["median"] for c in curve], "o-", label="median")
    axes[2].plot(x, [c["commit_to_publish_s"]["max"] for c in curve], "s--", label="slowest tenant")
    labels = ["idle MB per tenant (over the baseline)", "idle CPU per tenant (% of a core)", "commit -> published (s)"]
    for ax, label in zip(axes, labels, strict=True):
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("tenants")
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2]):
        ax.legend()
    fig.suptitle(f"exfm bench tenants: max_concurrent {r['max_concurrent']}, "
                 f"tenants_per_run {r['tenants_per_run'] or 'default'}")  # fmt: skip
    return figures.save(fig, path)


def summary(r: dict) -> str:
    b = r["baseline"]
    lines = [
        "| tenants | idle PSS MB per tenant (total) | idle RSS MB per tenant (total) | idle CPU per tenant "
        "(total) | peak PSS / RSS MB | commit->publish median / max | new tenants caught up | rows/s | "
        "Ray processes (train runs) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| 0 (baseline) | ({b['idle_pss_mb_total']:,.0f}) | ({b['idle_rss_mb_total']:,.0f}) | "
        f"({100 * b['idle_cpu_share']:.1f}%) | | | | | {b['ray_processes']} |",
    ]
    for c in r["curve"]:
        lat = c["commit_to_publish_s"]
        lines.append(
            f"| {c['tenants']} | {c['idle_pss_mb_per_tenant']:,.1f} ({c['idle_pss_mb_total']:,.0f}) | "
            f"{c['idle_rss_mb_per_tenant']:,.1f} ({c['idle_rss_mb_total']:,.0f}) | "
            f"{100 * c['idle_cpu_share_per_tenant']:.2f}% ({100 * c['idle_cpu_share_total']:.1f}%) | "
            f"{c['peak_pss_mb_total']:,.0f} / {c['peak_rss_mb_total']:,.0f} | {lat['median']:.1f} / "
            f"{lat['max']:.1f} s | {c['catch_up_s']:.1f} s | {c['rows_per_s']:,.0f} | {c['ray_processes']} "
            f"({c['train_runs'] if c.get('train_runs') is not None else '-'}) |"
        )
    serve = (f"Serve over {r['max_tenants']} tenants: p99 every tenant in turn / one tenant {r['serve_p99_ratio']}, "
             f"most models held by a replica {r['max_models_per_replica']}")  # fmt: skip
    if r.get("serve_p99_ratio") is None:
        serve = f"Serve part: {r.get('serve', {}).get('error', 'skipped')}"
    lines += [
        "",
        f"{r['max_tenants']} tenants: every tenant trained every window once, in order: "
        f"{'yes' if r['all_trained_every_window'] else 'NO'}; idle per tenant PSS "
        f"{r['idle_pss_mb_per_tenant']:,.1f} MB, RSS {r['idle_rss_mb_per_tenant']:,.1f} MB, "
        f"{100 * r['idle_cpu_share_per_tenant']:.2f}% of a core. {serve}.",
    ]
    return "\n".join(lines)
