"""The Data Augmentation Service on Ray Data: stream window -> FM group -> augmented Parquet.

Per range of windows (exfm-method.md section 3):
1. Leakage guard: the FM group's version must have trained on data strictly before each window.
2. The driver plans each window from its Parquet footers: units of about `unit_rows` rows (runs of
   row groups, `das/units.py`). It never reads rows, so its memory does not grow with the window.
3. One Ray Data execution for the whole range sends the units to a pool of DAS workers spread
   over the cluster (`das/worker.py`). A worker reads its unit, groups the rows by example_id
   and sends each example's first row to the FM group (one FM call per unique example, however
   many tenants logged it; the stream layout contract keeps an example in one unit), attaches the
   outputs to every row, joins delayed labels when a label stream is configured, and writes the
   unit as one Parquet part into the run's staging folder. A window whose delayed labels have not
   closed yet (`--labels`) keeps only its FM outputs, staged per unit (`_fm/window=t`), and is
   finished by a later run without calling the FM again.
4. The driver only adds up the units' counts. Commit, in window order: rename the staging folder
   to window=t, then record it in the manifest. A finished window re-run is a no-op.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid

import pyarrow as pa
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.das.label_join import LabelJoinConfig, label_watermark
from exfm_ray.das.store import AugmentedStore, WindowRecord
from exfm_ray.das.units import max_event_time, plan_window
from exfm_ray.das.window_log import record_metrics
from exfm_ray.das.worker import JOIN_KEYS, staged_labels_dir
from exfm_ray.data.stream import read_spec
from exfm_ray.errors import FMUnavailable
from exfm_ray.fm.config import FMConfig
from exfm_ray.fm.registry import FMVersion, check_no_leakage
from exfm_ray.schema import StreamSpec

STAGED_PLAN = "_PLAN.json"  # written once every unit of a waiting window has staged its FM outputs
WORKER_CLOCKS = ("read_s", "label_s", "write_s")


class AugmentConfig(Config):
    storage: str = Field(description="Storage root: augmented windows go to <storage>/augmented.")
    stream: str = Field(description="Stream folder (spec.json + window=<t>/ Parquet).")
    group_name: str = Field("exfm-fm", description="Actor name of the FM group.")
    group_namespace: str = Field("exfm", description="Ray namespace of the FM group.")
    batch_size: int = Field(4096, gt=0, description="Unique examples per FM call (a batch carries every tenant "
                            "row of its examples).")  # fmt: skip
    unit_rows: int = Field(65_536, gt=0, description="Rows per read unit (whole row groups are merged up to "
                           "it): what one DAS worker reads, labels and writes as one Parquet part.")  # fmt: skip
    workers: int = Field(1, ge=1, description="DAS workers (Ray Data actors that read, label and write units; "
                      "add some per node to spread a window over the cluster).")  # fmt: skip
    worker_cpus: float = Field(0.25, gt=0, description="CPUs reserved per DAS worker (it mostly waits on the FM).")
    worker_resources: dict[str, float] = Field(default_factory=dict, description="Custom resources per DAS worker.")
    units_per_worker: int = Field(2, ge=1, description="Units a DAS worker holds at once: the read and write of "
                               "one overlap the FM calls of another; bounds a worker's memory.")  # fmt: skip
    in_flight_per_worker: int = Field(4, ge=1, description="FM calls each DAS worker runs at once: keeps the FM "
                                   "ranks fed while batches travel.")  # fmt: skip
    max_wait_s: float = Field(120.0, ge=0, description="How long a batch waits for an unavailable FM before "
                              "its rows are emitted with the FM mask off.")  # fmt: skip
    labels: LabelJoinConfig | None = Field(None, description="Delayed-label stream; None: labels are in the rows.")


# A test seam, not configuration: a crash test sets it in the process it is about to kill, to end
# that process at this point of a window ("after_fm_pass": a unit's part is written;
# "after_write": every part is written, nothing committed).
CRASH_AT: str | None = None


class Augmenter:
    """Augments windows of one stream through a running FM group."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self.spec = read_spec(cfg.stream)
        self.store = AugmentedStore(cfg.storage)
        self._group = None
        self.timings: dict[str, float] = {}  # phases of the last augment_range call, seconds
        self._last_commit = 0.0

    @property
    def group(self):
        """The FM group's handle, looked up on first use (windows no FM may label need none)."""
        import ray

        if self._group is None:
            self._group = ray.get_actor(self.cfg.group_name, namespace=self.cfg.group_namespace)
        return self._group

    def window_bounds(self, t: int) -> tuple[int, int]:
        starts = self.spec.window_starts
        if t + 1 < len(starts):
            return starts[t], starts[t + 1]
        return starts[t], max_event_time(self.cfg.stream, t) + 1

    def augment(self, t: int) -> dict:
        """Augment window t; returns {"window", "status", "record"}. Idempotent."""
        return self.augment_range([t])[0]

    def augment_range(self, windows: list[int], progress=None) -> list[dict]:
        """Augment windows; results (and `progress(result)` calls) come in the order given. The FM
        work of every pending window runs as one Ray Data job (one worker pool for the range);
        windows are committed in that order."""
        self.timings = {}
        self._last_commit = 0.0
        done = self.store.records()
        results = {t: {"window": t, "status": "already_done", "record": done[t]} for t in windows if t in done}
        pending = list(dict.fromkeys(t for t in windows if t not in done))
        reported = 0

        def report(result: dict | None = None) -> None:
            nonlocal reported
            if result is not None:
                results[result["window"]] = result
            while reported < len(windows) and windows[reported] in results:
                if progress:
                    progress(results[windows[reported]])
                reported += 1

        if pending:
            mark = time.perf_counter()
            version = self._group_version()
            for t in pending:  # refuse before any work, naming the first offending window
                check_no_leakage(version, t, self.spec.window_starts[t])
            emb_dim = fm_emb_dim(version.spec, version.fm)
            self._phase("fm_version", mark)
            self._run(pending, emb_dim, report, "fm")
        report()
        return [results[t] for t in windows]

    def augment_unlabeled(self, t: int, fm: FMConfig) -> dict:
        """Commit window t with the FM mask off on every row: no FM version has trained on data
        before it (the first windows of a stream). Counted as masked rows; nothing is dropped.
        `fm`: the FM that will label later windows (its embedding width sizes the empty column)."""
        done = self.store.records()
        if t in done:
            return {"window": t, "status": "already_done", "record": done[t]}
        results = []
        self._run([t], fm_emb_dim(self.spec, fm), results.append, "null")
        return results[0]

    def _run(self, pending: list[int], emb_dim: int, report, mode: str) -> None:
        start = time.perf_counter()
        staging = self.store.staging_dir(uuid.uuid4().hex)
        jobs = [_Window(self, t, mode, staging, start) for t in pending]
        self._phase("plan", start)
        ready: dict[int, tuple[_Window, dict | None]] = {}
        next_up = 0

        def finished(job: _Window, result: dict | None) -> None:
            """Commit (or report as waiting) every window up to the first one still in flight."""
            nonlocal next_up
            ready[job.t] = (job, result)
            while next_up < len(pending) and pending[next_up] in ready:
                report(self._commit(*ready.pop(pending[next_up])))
                next_up += 1

        for job in jobs:
            if not job.units:  # staged FM outputs still waiting for their labels
                finished(job, job.waiting_result())
        todo = [job for job in jobs if job.units]
        if todo:
            self._stream(todo, emb_dim, staging, finished)

    def _stream(self, jobs: list[_Window], emb_dim: int, staging, finished) -> None:
        """One Ray Data execution: units -> DAS worker pool -> a Parquet part and counts per unit."""
        import ray
        from ray.data import ActorPoolStrategy

        from exfm_ray.das.worker import DASWorker

        cfg = self.cfg
        by_window = {job.t: job for job in jobs}
        units = [unit for job in jobs for unit in job.units]
        settings = {
            "group_name": cfg.group_name,
            "group_namespace": cfg.group_namespace,
            "max_wait_s": cfg.max_wait_s,
            "batch_size": cfg.batch_size,
            "in_flight": cfg.in_flight_per_worker,
            "labels": cfg.labels.model_dump(mode="json") if cfg.labels else None,
        }
        per_worker = cfg.units_per_worker
        # from_blocks: one block per unit with its metadata computed here (from_arrow runs a metadata
        # task per block in a worker that may be cold: seconds per window, measured in an earlier stop).
        ds = ray.data.from_blocks([pa.Table.from_pylist([unit]) for unit in units]).map_batches(
            DASWorker,
            fn_constructor_args=(settings, self.spec.to_json(), emb_dim, str(staging), str(self.store.root)),
            batch_size=1,  # one unit per call: a worker's memory is bounded by units_per_worker units
            batch_format="pyarrow",
            num_cpus=cfg.worker_cpus,
            resources=dict(cfg.worker_resources) or None,
            compute=ActorPoolStrategy(
                size=min(cfg.workers, len(units)),
                max_tasks_in_flight_per_actor=per_worker,
                max_concurrent_calls_per_actor=per_worker,
                enable_true_multi_threading=True,  # the worker is thread-safe; its calls mostly wait
            ),
        )
        mark = time.perf_counter()
        for row in ds.iter_rows():
            if "first_unit" not in self.timings:
                self._phase("first_unit", mark)
            for name in WORKER_CLOCKS:
                self.timings[f"worker_{name}"] = round(self.timings.get(f"worker_{name}", 0.0) + row[name], 3)
            job = by_window[row["window"]]
            job.add(row)
            if CRASH_AT == "after_fm_pass":
                _crash()
            if job.complete:
                finished(job, job.close())
        self._phase("fm_stream", mark)
        missing = [job.t for job in jobs if not job.complete]
        assert not missing, f"windows {missing} did not come back complete from the DAS workers"

    def _commit(self, job: _Window, result: dict | None) -> dict:
        """Commit a finished window (result None) or pass on a window that waits for labels."""
        if result is not None:
            return result
        mark = time.perf_counter()
        record = job.record(since=self._last_commit)  # a window's time starts at the previous commit
        self.store.commit(job.t, job.staged, record, self.spec)
        record_metrics(record)
        shutil.rmtree(staged_labels_dir(self.store.root, job.t), ignore_errors=True)
        self._last_commit = time.perf_counter()
        self._phase("commit", mark)
        return {"window": job.t, "status": "committed", "record": record}

    def _group_version(self) -> FMVersion:
        import ray

        version = ray.get(self.group.status.remote()).version
        if version is None:
            raise FMUnavailable(f"FM group {self.cfg.group_name!r} holds no FM version yet")
        return version

    def _phase(self, name: str, since: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - since, 3)


class _Window:
    """One window in flight, as the driver sees it: its units and the counts they sent back."""

    def __init__(self, aug: Augmenter, t: int, mode: str, staging, start: float):
        self.aug, self.t, self.start = aug, t, start
        self.staged = staging / f"window={t}"
        labels = aug.cfg.labels
        self.waiting, begin, end = False, -1, -1
        if labels is not None:
            begin, end = aug.window_bounds(t)
            self.waiting = label_watermark(labels) < end + labels.attribution_s
        plan = staged_labels_dir(aug.store.root, t) / STAGED_PLAN
        if mode == "fm" and plan.exists():  # FM outputs of an earlier run that waited for delayed labels
            saved = json.loads(plan.read_text())
            units, self.num_rows, mode = saved["units"], saved["rows"], "staged"
        else:
            units, self.num_rows = plan_window(aug.cfg.stream, t, aug.cfg.unit_rows)
        self.plan = units
        run = not (mode == "staged" and self.waiting)
        extra = {"mode": mode, "waiting": self.waiting and mode != "staged", "begin": begin, "end": end}
        self.units = [{**u, **extra} for u in units] if run else []
        self.stats: dict[int, dict] = {}  # by unit index: a unit Ray Data ran twice counts once

    @property
    def complete(self) -> bool:
        return len(self.stats) == len(self.units)

    def add(self, row: dict) -> None:
        self.stats[row["index"]] = row

    def waiting_result(self) -> dict:
        return {"window": self.t, "status": "waiting_for_labels", "record": None}

    def close(self) -> dict | None:
        """Every unit is back: record a waiting window's staged plan, or hand the window to commit."""
        if self.units[0]["waiting"]:
            folder = staged_labels_dir(self.aug.store.root, self.t)
            (folder / STAGED_PLAN).write_text(json.dumps({"units": self.plan, "rows": self.num_rows}))
            return self.waiting_result()
        if CRASH_AT == "after_write":
            _crash()
        return None

    def record(self, since: float) -> WindowRecord:
        stats = self.stats.values()
        total = {k: sum(s[k] for s in stats) for k in ("rows", "fm_calls", "masked", "unlabeled")}
        versions = {v for s in stats for v in s["versions"].split(",") if v}
        record = WindowRecord(
            window=self.t,
            input_rows=self.num_rows,
            output_rows=total["rows"],
            fm_calls=total["fm_calls"],
            fm_versions=sorted(versions),
            masked_rows=total["masked"],
            unlabeled_rows=total["unlabeled"],
            duration_s=round(time.perf_counter() - max(self.start, since), 3),
            label_join={k: sum(s[f"join_{k}"] for s in stats) for k in JOIN_KEYS} if self.aug.cfg.labels else {},
        )
        assert record.output_rows == record.input_rows, record
        return record


def fm_emb_dim(spec: StreamSpec, fm: FMConfig) -> int:
    from exfm_ray.fm.model import build_fm

    return build_fm(spec, fm, device="meta").hidden_dim


def _crash() -> None:
    import os

    os._exit(3)


def augment_windows(cfg: AugmentConfig, windows: list[int], progress=None) -> list[dict]:
    """Augment several windows in order; `progress(result)` is called after each."""
    return Augmenter(cfg).augment_range(windows, progress)
