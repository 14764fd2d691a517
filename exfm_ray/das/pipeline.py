"""The Data Augmentation Service on Ray Data: stream window -> FM group -> augmented Parquet.

Per range of windows (exfm-method.md section 3):
1. Leakage guard: the FM group's version must have trained on data strictly before each window.
2. The driver reads each window and groups its rows by example_id (every tenant row of an example
   lands in the same batch, `batch_size` examples per batch).
3. One Ray Data execution for the whole range streams the batches through an actor pool of thin
   FMLabeler clients of the FM group, several calls in flight per labeler: each batch's first row
   per example goes to the FM (one FM call per unique example, however many tenants logged it) and
   the outputs come back attached to every row of the batch.
4. The driver writes each augmented batch as it arrives (joining delayed labels when a label stream
   is configured) into a staging folder, so the write overlaps the FM work. A window whose delayed
   labels have not closed yet (`--labels`) keeps only its FM outputs, staged per window
   (`_fm/window=t`), and is finished by a later run without calling the FM again.
5. Commit, in window order: rename the staging folder to window=t, then record it in the manifest.
   A finished window re-run is a no-op.

Measured on 2 cores (docs/benchmarks.md, "Data Augmentation Service"): the former design ran two
Ray Data executions per window (read + dedup + FM, then read + attach + write_parquet); its fixed
cost (two plans, actor pool start, read and write tasks in fresh workers) dominated a window.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.das.columns import FM_VERSION, attach, first_occurrence, label_columns, label_table
from exfm_ray.das.label_join import LabelJoinConfig, join_labels, label_watermark, read_events
from exfm_ray.das.store import AugmentedStore, WindowRecord, parquet_options
from exfm_ray.das.window_log import record_metrics
from exfm_ray.data.stream import read_spec, window_dir
from exfm_ray.errors import FMUnavailable
from exfm_ray.fm.config import FMConfig
from exfm_ray.fm.registry import FMVersion, check_no_leakage
from exfm_ray.schema import StreamSpec

ROW_GROUP_ROWS = 32_768  # augmented rows per Parquet row group (the last one is written after the FM is done)


class AugmentConfig(Config):
    storage: str = Field(description="Storage root: augmented windows go to <storage>/augmented.")
    stream: str = Field(description="Stream folder (spec.json + window=<t>/ Parquet).")
    group_name: str = Field("exfm-fm", description="Actor name of the FM group.")
    group_namespace: str = Field("exfm", description="Ray namespace of the FM group.")
    batch_size: int = Field(4096, gt=0, description="Unique examples per FM call (a batch carries every tenant "
                            "row of its examples).")  # fmt: skip
    labelers: int = Field(1, ge=1, description="Actors in the FMLabeler pool.")
    labeler_cpus: float = Field(0.25, gt=0, description="CPUs reserved per labeler (it mostly waits on the FM).")
    labeler_resources: dict[str, float] = Field(default_factory=dict, description="Custom resources per labeler.")
    in_flight_per_labeler: int = Field(4, ge=1, description="FM calls each labeler runs at once: keeps the FM "
                                       "ranks fed while batches travel; bounds memory.")  # fmt: skip
    max_wait_s: float = Field(120.0, ge=0, description="How long a batch waits for an unavailable FM before "
                              "its rows are emitted with the FM mask off.")  # fmt: skip
    labels: LabelJoinConfig | None = Field(None, description="Delayed-label stream; None: labels are in the rows.")


# A test seam, not configuration: a crash test sets it in the process it is about to kill, to end
# that process at this point of a window ("after_fm_pass" or "after_write").
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
        last = pq.read_table(window_dir(self.cfg.stream, t), columns=["event_time"]).column("event_time")
        return starts[t], int(pc.max(last).as_py()) + 1

    def augment(self, t: int) -> dict:
        """Augment window t; returns {"window", "status", "record"}. Idempotent."""
        return self.augment_range([t])[0]

    def augment_range(self, windows: list[int], progress=None) -> list[dict]:
        """Augment windows; results (and `progress(result)` calls) come in the order given. The FM
        work of every pending window runs as one Ray Data job (one labeler pool for the range);
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
            emb_dim = _emb_dim(version.spec, version.fm)
            self._phase("fm_version", mark)
            self._run(pending, emb_dim, report)
        report()
        return [results[t] for t in windows]

    def augment_unlabeled(self, t: int, fm: FMConfig) -> dict:
        """Commit window t with the FM mask off on every row: no FM version has trained on data
        before it (the first windows of a stream). Counted as masked rows; nothing is dropped.
        `fm`: the FM that will label later windows (its embedding width sizes the empty column)."""
        done = self.store.records()
        if t in done:
            return {"window": t, "status": "already_done", "record": done[t]}
        job = _WindowJob(self, t, time.perf_counter())
        return self._commit(job, job.finish_with(job.null_labels(_emb_dim(self.spec, fm)), stage=False))

    def _run(self, pending: list[int], emb_dim: int, report) -> None:
        start = time.perf_counter()
        jobs = [_WindowJob(self, t, start) for t in pending]
        self._phase("read", start)
        ready: dict[int, tuple[_WindowJob, dict | None]] = {}
        next_up = 0

        def finished(job: _WindowJob, result: dict | None) -> None:
            """Commit (or report as waiting) every window up to the first one still in flight."""
            nonlocal next_up
            ready[job.t] = (job, result)
            while next_up < len(pending) and pending[next_up] in ready:
                report(self._commit(*ready.pop(pending[next_up])))
                next_up += 1

        fm_jobs = []
        for job in jobs:
            staged = self.fm_labels_path(job.t)
            if staged.exists():  # FM outputs of an earlier run that waited for delayed labels
                finished(job, job.finish_with(pq.read_table(staged), stage=False))
            elif job.table.num_rows == 0:
                finished(job, job.finish_with(job.null_labels(emb_dim), stage=True))
            else:
                fm_jobs.append(job)
        if fm_jobs:
            self._fm_stream(fm_jobs, emb_dim, finished)

    def _fm_stream(self, jobs: list[_WindowJob], emb_dim: int, finished) -> None:
        """One Ray Data execution: grouped batches -> FMLabeler pool -> augmented batches, each
        written as it arrives."""
        import ray
        from ray.data import ActorPoolStrategy

        from exfm_ray.das.transforms import FMLabeler

        start = time.perf_counter()
        by_window = {job.t: job for job in jobs}
        calls = self.cfg.in_flight_per_labeler
        # from_blocks: block metadata computed here; from_arrow would run a metadata task per block in a
        # worker that may be cold (importing Ray Data there: ~2 s per window, measured).
        blocks = ray.data.from_blocks([block for job in jobs for block in job.batches(self.cfg.batch_size)])
        ds = blocks.map_batches(
            FMLabeler,
            fn_constructor_args=(
                self.cfg.group_name,
                self.cfg.group_namespace,
                self.cfg.max_wait_s,
                self.spec.to_json(),
                emb_dim,
            ),
            batch_size=None,  # a block is one batch: the driver cut it at example boundaries
            batch_format="pyarrow",
            num_cpus=self.cfg.labeler_cpus,
            resources=dict(self.cfg.labeler_resources) or None,
            compute=ActorPoolStrategy(
                size=self.cfg.labelers,
                max_tasks_in_flight_per_actor=calls,
                max_concurrent_calls_per_actor=calls,
                enable_true_multi_threading=True,  # FMLabeler is thread-safe; its calls mostly wait
            ),
        )
        self._phase("group_rows", start)
        mark = time.perf_counter()
        for bundle in ds.iter_internal_ref_bundles():
            for ref in bundle.block_refs:
                out = ray.get(ref)
                if "first_batch" not in self.timings:
                    self._phase("first_batch", mark)
                write = time.perf_counter()
                for t, part in _split_by_window(out):
                    job = by_window[t]
                    job.add(part)
                    if job.complete:
                        finished(job, job.close(stage=True))
                self._phase("driver_write", write)
        self._phase("fm_stream", mark)
        missing = [job.t for job in jobs if not job.complete]
        assert not missing, f"windows {missing} did not come back complete from the FM pass"

    def _commit(self, job: _WindowJob, result: dict | None) -> dict:
        """Commit a finished window (result None) or pass on a window that waits for labels."""
        if result is not None:
            return result
        mark = time.perf_counter()
        record = job.record(since=self._last_commit)  # a window's time starts at the previous commit
        self.store.commit(job.t, job.staged.parent, record, self.spec)
        record_metrics(record)
        self.fm_labels_path(job.t).unlink(missing_ok=True)
        self._last_commit = time.perf_counter()
        self._phase("commit", mark)
        return {"window": job.t, "status": "committed", "record": record}

    def _group_version(self) -> FMVersion:
        import ray

        version = ray.get(self.group.status.remote()).version
        if version is None:
            raise FMUnavailable(f"FM group {self.cfg.group_name!r} holds no FM version yet")
        return version

    def fm_labels_path(self, t: int) -> Path:
        return self.store.root / "_fm" / f"window={t}" / "labels.parquet"

    def _phase(self, name: str, since: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - since, 3)


class _WindowJob:
    """One window in flight: its rows, grouped by example for the FM, and the staging writer."""

    def __init__(self, aug: Augmenter, t: int, start: float):
        self.aug, self.t, self.start = aug, t, start
        self.table: pa.Table | None = pq.read_table(window_dir(aug.cfg.stream, t), partitioning=None)
        self.num_rows = self.table.num_rows
        self.events: pa.Table | None = None
        self.waiting = False
        if aug.cfg.labels is not None:
            begin, end = aug.window_bounds(t)
            self.waiting = label_watermark(aug.cfg.labels) < end + aug.cfg.labels.attribution_s
            if not self.waiting:
                self.events = read_events(aug.cfg.labels, begin, end)
        self.staged = aug.store.staging_dir(uuid.uuid4().hex) / f"window={t}" / "part-0.parquet"
        self.rows_in = 0
        self.buffer: list[pa.Table] = []
        self.writer: pq.ParquetWriter | None = None
        self.labels: list[pa.Table] = []  # FM outputs per example, kept only while waiting for labels
        self.counts = {"written": 0, "fm_calls": 0, "masked": 0, "unlabeled": 0}
        self.versions: set[str] = set()
        self.join: dict[str, int] = {}

    def null_labels(self, emb_dim: int) -> pa.Table:
        """No FM output for any example of the window (its rows get the FM mask off)."""
        ids = pa.array(np.unique(self.table.column("example_id").to_numpy()), pa.int64())
        return label_table(ids, None, self.aug.spec.tenant_names, emb_dim, int(time.time()))

    def batches(self, batch_size: int) -> list[pa.Table]:
        """The window's rows grouped by example_id, cut every `batch_size` examples."""
        ids = self.table.column("example_id").to_numpy()
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # examples in order of first row
        example = rank[inverse]
        order = np.argsort(example, kind="stable")
        grouped = self.table.take(pa.array(order))
        cuts = np.searchsorted(example[order], np.arange(0, len(first), batch_size)).tolist() + [len(ids)]
        return [grouped.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]

    @property
    def complete(self) -> bool:
        return self.rows_in == self.num_rows

    def add(self, rows: pa.Table) -> None:
        """Augmented rows (every tenant row of their examples) of this window."""
        self.rows_in += rows.num_rows
        if self.waiting:
            self.labels.append(_first_rows(rows).select(label_columns(self.aug.spec.tenant_names)))
            return
        version = rows.column(FM_VERSION)
        labeled = rows.column("example_id").filter(version.is_valid()) if version.null_count else rows["example_id"]
        self.counts["fm_calls"] += len(np.unique(labeled.to_numpy()))
        self.counts["masked"] += rows.num_rows - int(pc.sum(rows.column("fm_mask")).as_py() or 0)
        self.counts["unlabeled"] += version.null_count
        self.versions |= {v for v in pc.unique(version).to_pylist() if v}
        if self.events is not None:
            rows, counts = join_labels(rows, _events_of(self.events, rows), self.aug.spec, self.aug.cfg.labels)
            for key, n in counts.items():
                self.join[key] = self.join.get(key, 0) + n
        self.buffer.append(rows)
        if sum(b.num_rows for b in self.buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer)
        self.buffer = []
        if self.writer is None:
            self.staged.parent.mkdir(parents=True)
            self.writer = pq.ParquetWriter(self.staged, table.schema, **parquet_options(table.schema))
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.counts["written"] += table.num_rows

    def finish_with(self, labels: pa.Table, stage: bool) -> dict | None:
        """Finish the window from its FM outputs per example (staged, or none at all)."""
        self.add(attach(self.table, labels, self.aug.spec))
        return self.close(stage)

    def close(self, stage: bool) -> dict | None:
        """End of the window's rows: stage FM outputs (waiting for labels) or close the file.
        Returns the result of a waiting window, None for a window ready to commit."""
        if CRASH_AT == "after_fm_pass":
            _crash()
        self.table = None  # every row has come back: free the window's input
        if self.waiting:
            if stage and self.labels:
                path = self.aug.fm_labels_path(self.t)
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.concat_tables(self.labels), path.with_suffix(".tmp"))
                path.with_suffix(".tmp").rename(path)
            return {"window": self.t, "status": "waiting_for_labels", "record": None}
        self._flush()
        if self.writer is not None:
            self.writer.close()
        if CRASH_AT == "after_write":
            _crash()
        return None

    def record(self, since: float) -> WindowRecord:
        c = self.counts
        record = WindowRecord(
            window=self.t,
            input_rows=self.num_rows,
            output_rows=c["written"],
            fm_calls=c["fm_calls"],
            fm_versions=sorted(self.versions),
            masked_rows=c["masked"],
            unlabeled_rows=c["unlabeled"],
            duration_s=round(time.perf_counter() - max(self.start, since), 3),
            label_join=self.join if self.events is not None else {},
        )
        assert record.output_rows == record.input_rows, record
        return record


def _emb_dim(spec: StreamSpec, fm: FMConfig) -> int:
    from exfm_ray.fm.model import build_fm

    return build_fm(spec, fm, device="meta").hidden_dim


def _split_by_window(rows: pa.Table) -> list[tuple[int, pa.Table]]:
    """A batch comes from one window; split it if Ray Data ever merged two."""
    lo, hi = pc.min_max(rows.column("window")).values()
    if lo.as_py() == hi.as_py():
        return [(lo.as_py(), rows)]
    windows = pc.unique(rows.column("window")).to_pylist()
    return [(t, rows.filter(pc.equal(rows.column("window"), t))) for t in windows]


def _first_rows(rows: pa.Table) -> pa.Table:
    return rows.filter(pa.array(first_occurrence(rows.column("example_id").to_numpy())))


def _events_of(events: pa.Table, rows: pa.Table) -> pa.Table:
    """The label events of these rows' examples (a batch holds every row of its examples)."""
    return events.filter(pc.is_in(events.column("example_id"), value_set=rows.column("example_id").combine_chunks()))


def _crash() -> None:
    import os

    os._exit(3)


def augment_windows(cfg: AugmentConfig, windows: list[int], progress=None) -> list[dict]:
    """Augment several windows in order; `progress(result)` is called after each."""
    return Augmenter(cfg).augment_range(windows, progress)
