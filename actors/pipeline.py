"""`exfm run`: the whole ExFM loop over a stream's windows, on one Ray cluster.

Per window t: the streaming FM training job (one Ray Train run over all windows, publishing a
version after each) provides the version trained through t - delay -> the FM group switches to
it -> the DAS augments window t -> every tenant's run (following the stream) evaluates and trains
on it -> its checkpoint is published and hot-reloaded by Ray Serve. The FM trains ahead while the
DAS and the students work on earlier windows. A rerun continues where the last one stopped: the
stream, FM versions, committed windows and tenant checkpoints on storage are all reused.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from actors.fm_group import FMGroupConfig
from actors.launch import find_fm_group, start_fm_group, start_tenant_manager, stop_fm_group
from actors.remote import train_fm_task
from actors.tenant_manager import TenantManagerConfig
from exfm_ray.das.pipeline import AugmentConfig, Augmenter, fm_emb_dim
from exfm_ray.das.store import AugmentedStore
from exfm_ray.das.window_log import summary_line
from exfm_ray.data.sources import load_stream
from exfm_ray.data.stream import SPEC_FILE, read_spec
from exfm_ray.errors import PipelineFailure
from exfm_ray.fm.registry import FMRegistry, FMVersion, fm_window_for, window_labeled_by
from exfm_ray.fm.train_job import FMTrainConfig
from exfm_ray.loopfm.builder import fold_augmented, open_run_store
from exfm_ray.loopfm.store import RepresentationStore
from exfm_ray.observability import LOG
from exfm_ray.pipeline import report as run_report
from exfm_ray.pipeline.config import PipelineConfig
from exfm_ray.serving.check import check_serving
from exfm_ray.serving.deploy import deploy
from exfm_ray.students.store import StudentStore
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.registry import TenantRegistry


class PipelineSupervisor:
    """Drives the loop from the driver: starts the FM job, the FM group and the tenant manager, augments
    each window in order, deploys Serve once a student exists, checks serving, writes the report."""

    def __init__(self, cfg: PipelineConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.storage = Path(cfg.storage).resolve()
        self.stream_dir = self.storage / "stream"
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        self.serve_cfg = cfg.serve_config()
        self.timings: dict[int, dict[str, float]] = {}
        self.manager = self.fm_job = self.group = None
        self.loop_store: RepresentationStore | None = None
        self.own_group = False
        self.serve_url: str | None = None

    def run(self) -> dict:
        started = time.perf_counter()
        spec = self._stream()
        windows = spec.num_windows
        names = self._register_tenants(spec)
        self.log(f"stream {spec.name}: {windows} windows, tenants {names}; storage {self.storage}")
        self._open_loop_store(spec)
        try:
            self.fm_job = self._start_fm_training(windows)
            self.manager = start_tenant_manager(TenantManagerConfig(storage=str(self.storage),
                max_concurrent=self.cfg.max_concurrent_tenants, tenants_per_run=self.cfg.tenants_per_run,
                poll_s=0.5, young_fm_wait_s=self.cfg.young_fm_wait_s))  # fmt: skip
            students = self.manager.train.remote(0, windows - 1, True)
            augmenter = Augmenter(AugmentConfig(storage=str(self.storage), stream=str(self.stream_dir),
                group_name=self.cfg.fm_group, batch_size=self.cfg.das_batch_size,
                workers=self.cfg.das_workers, worker_resources=self.cfg.das_resources))  # fmt: skip
            for t in range(windows):
                self._augment(augmenter, t)
                self._fold_loop_store(augmenter.store)
                self._serve_when_ready()
            status = ray.get(students)
            for name, r in sorted(status["runs"].items()):
                self.log(f"tenant {name}: {r['status']}, {r.get('starts', 0)} run start(s)")
            failed = {n: r.get("error") for n, r in status["runs"].items() if r["status"] == "failed"}
            if failed:
                raise PipelineFailure(f"tenant runs failed: {failed}")
            if self.fm_job is not None:
                ray.get(self.fm_job)
            self._serve_when_ready()
            serving_results = self._check_serving(spec, names)
        finally:
            self._stop_training()
        report = self._report(spec, names, serving_results, time.perf_counter() - started)
        return report

    # -- stages -------------------------------------------------------------------------------

    def _stream(self):
        if not (self.stream_dir / SPEC_FILE).exists():
            stream = load_stream(self.cfg.source)
            stream.write(self.stream_dir)
            self.log(f"wrote the stream: {stream.report.summary()}")
        return read_spec(self.stream_dir)

    def _register_tenants(self, spec) -> list[str]:
        registry = TenantRegistry(self.storage)
        wanted = self.cfg.tenants or [
            TenantConfig(name=n, control=True, student=self.cfg.student) for n in spec.tenant_names
        ]
        for tenant in wanted:
            resolve(tenant, spec)
            if tenant.name not in {e.config.name for e in registry.active()}:
                registry.add(tenant)
        return [e.config.name for e in registry.active()]

    def _open_loop_store(self, spec) -> None:
        """Declare the LoopFM store (config and embedding size) before any tenant starts, when a
        tenant of the run reads one: trainers size their models from it."""
        tenants = [e.config for e in TenantRegistry(self.storage).active()]
        if any(t.distill().loopfm for t in tenants):
            self.loop_store = open_run_store(self.storage, tenants, fm_emb_dim(spec, self.cfg.fm))

    def _fold_loop_store(self, augmented: AugmentedStore) -> None:
        """Fold every newly committed window into the store (a rerun catches up what a crash left)."""
        if self.loop_store is None:
            return
        began = time.perf_counter()
        for t in fold_augmented(augmented, self.loop_store):
            self.timings.setdefault(t, {})["loopfm_fold"] = time.perf_counter() - began
            v = self.loop_store.manifest()[str(t)]
            self.log(f"window {t}: LoopFM store version {t}, {v.entities} entities, {v.bytes / 1e6:.2f} MB")
            began = time.perf_counter()

    def _start_fm_training(self, windows: int):
        last = fm_window_for(windows - 1, self.cfg.fm_delay)  # the last window any label needs
        current = FMRegistry(self.storage).current()
        if last is None or (current is not None and current.through_window >= last):
            return None
        cfg = FMTrainConfig(storage=str(self.storage), stream=str(self.stream_dir), through_window=last,
            fm=self.cfg.fm, num_workers=self.cfg.fm_workers, publish_each_window=True,
            resources_per_worker=self.cfg.fm_resources)  # fmt: skip
        return train_fm_task().remote(cfg)

    def _augment(self, augmenter: Augmenter, t: int) -> None:
        began = time.perf_counter()
        timing: dict[str, float] = {}
        if t in augmenter.store.records():
            self.log(f"window {t}: already augmented")
            return
        k = fm_window_for(t, self.cfg.fm_delay)
        if k is None:
            result = augmenter.augment_unlabeled(t, self.cfg.fm)
        else:
            version = self._version_through(k)
            timing["fm_wait"] = time.perf_counter() - began
            mark = time.perf_counter()
            self._group_on(version)
            timing["fm_switch"] = time.perf_counter() - mark
            mark = time.perf_counter()
            [result] = augmenter.augment_range([t])
            timing["das"] = time.perf_counter() - mark
        timing.setdefault("das", time.perf_counter() - began)
        self.timings[t] = timing
        self.log(summary_line(result))

    def _version_through(self, k: int) -> FMVersion:
        """The FM version trained through window k (waits for the streaming FM job to publish it)."""
        registry = FMRegistry(self.storage)
        while True:
            exact = [v for v in registry.versions() if v.through_window == k]
            if exact:
                return exact[-1]
            if self.fm_job is None or ray.wait([self.fm_job], timeout=0)[0]:
                if self.fm_job is not None:
                    ray.get(self.fm_job)  # raises the training job's error, if any
                older = [v for v in registry.versions() if v.through_window <= k]
                if not older:
                    raise PipelineFailure(f"no FM version trained through window {k} in {registry.root}")
                return max(older, key=lambda v: v.through_window)
            time.sleep(0.5)

    def _group_on(self, version: FMVersion) -> None:
        if self.group is None:
            self.group = find_fm_group(self.cfg.fm_group)
            if self.group is None:
                cfg = FMGroupConfig(name=self.cfg.fm_group, storage=str(self.storage), num_shards=self.cfg.fm_shards,
                                    shard_resources=self.cfg.fm_resources)  # fmt: skip
                self.group = start_fm_group(cfg, version=version.version, detached=False)
                self.own_group = True
                return
        if ray.get(self.group.status.remote()).version_name != version.version:
            ray.get(self.group.switch.remote(version.version))

    def _serve_when_ready(self) -> None:
        if self.serve_url is None and StudentStore(self.storage).tenants():
            self.serve_url = deploy(self.serve_cfg)
            self.log(f"students served at {self.serve_url} (new checkpoints hot-reload)")

    def _stop_training(self) -> None:
        if self.manager is not None:
            ray.kill(self.manager)
        if self.fm_job is not None and not ray.wait([self.fm_job], timeout=0)[0]:
            ray.cancel(self.fm_job, force=True)
        if self.own_group:
            stop_fm_group(self.cfg.fm_group)

    def _check_serving(self, spec, tenants: list[str]) -> dict:
        if self.serve_url is None:
            return {"url": None, "tenants": {}}
        return check_serving(self.storage, self.serve_cfg, spec, tenants, sample_rows=self.cfg.sample_rows,
                             latency_requests=self.cfg.latency_requests)  # fmt: skip

    # -- report -------------------------------------------------------------------------------

    def _report(self, spec, tenants: list[str], serving_results: dict, seconds: float) -> dict:
        registry = TenantRegistry(self.storage)
        histories = {n: registry.history(n) for n in tenants}
        timings = self._timings_with_training(histories, FMRegistry(self.storage).versions())
        augmented = AugmentedStore(self.storage)
        staleness = {}
        for t in augmented.committed():
            cols = augmented.read_window(t, columns=["example_id", "event_time", "fm_data_watermark"])
            marks = cols.column("fm_data_watermark").to_numpy(zero_copy_only=False).astype(float)
            staleness[t] = run_report.staleness_hours(cols.column("event_time").to_numpy(), marks)
        system = run_report.system_rows(augmented.records(), staleness, timings)
        meta = {"run_id": self.run_id, "stream": spec.name, "num_windows": spec.num_windows,
                "fm_delay": self.cfg.fm_delay, "seconds": round(seconds, 1), "storage": str(self.storage)}  # fmt: skip
        report = run_report.build(histories, system, serving_results, self.cfg.warmup, meta)
        out = self.storage / "reports" / self.run_id
        report["paths"] = {k: str(v) for k, v in run_report.write(report, out).items()}
        return report

    def _timings_with_training(self, histories: dict, versions: list[FMVersion]) -> dict[int, dict[str, float]]:
        """Add what other processes did per window: FM training (between version publishes), students."""
        timings = {t: dict(v) for t, v in self.timings.items()}
        ordered = sorted(versions, key=lambda v: v.created_at)
        for prev, cur in zip(ordered, ordered[1:], strict=False):
            t = window_labeled_by(cur.through_window, self.cfg.fm_delay)
            timings.setdefault(t, {})["fm_train"] = cur.created_at - prev.created_at
        for h in histories.values():
            for r in h:
                cell = timings.setdefault(r["window"], {})
                cell["students"] = max(cell.get("students", 0.0), r["ended_at"] - r["started_at"])
        return timings


def run_pipeline(cfg: PipelineConfig, log=print) -> dict:
    LOG.info("exfm run starting on %s", cfg.storage)
    return PipelineSupervisor(cfg, log).run()
