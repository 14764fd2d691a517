"""The Data Augmentation Service on Ray Data: stream window -> FM group -> augmented Parquet.

Per window t (exfm-method.md section 3):
1. Leakage guard: the FM group's version must have trained on data strictly before t starts.
2. FM pass (does not wait for labels): Ray Data reads the window, keeps the first row of each
   example_id (one FM call per unique example, however many tenants logged it) and streams the
   batches through an actor pool of thin FMLabeler clients of the FM group, with bounded calls
   in flight. The FM outputs are staged per window (`_fm/window=t`), so a re-run never re-labels.
3. Row pass (once the label stream has closed the window's attribution window): Ray Data reads
   the window again, attaches the FM outputs to every tenant row by example_id, joins delayed
   labels, and writes Parquet to a staging folder.
4. Commit: rename the staging folder to window=t, then record it in the manifest. A finished
   window re-run is a no-op.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.das.columns import FM_VERSION, first_occurrence, label_table
from exfm_ray.das.label_join import LabelJoinConfig, join_labels, label_watermark, read_events
from exfm_ray.das.store import AugmentedStore, WindowRecord
from exfm_ray.das.transforms import FMLabeler, attach_labels, keep_first
from exfm_ray.data.stream import read_spec, window_dir
from exfm_ray.fm.registry import FMVersion, check_no_leakage


class AugmentConfig(Config):
    storage: str = Field(description="Storage root: augmented windows go to <storage>/augmented.")
    stream: str = Field(description="Stream folder (spec.json + window=<t>/ Parquet).")
    group_name: str = Field("exfm-fm", description="Actor name of the FM group.")
    group_namespace: str = Field("exfm", description="Ray namespace of the FM group.")
    batch_size: int = Field(4096, gt=0, description="Rows per FM call.")
    labelers: int = Field(1, ge=1, description="Actors in the FMLabeler pool.")
    labeler_cpus: float = Field(0.25, gt=0, description="CPUs reserved per labeler (it only waits on the FM).")
    in_flight_per_labeler: int = Field(2, ge=1, description="Batches in flight per labeler (bounds memory).")
    max_wait_s: float = Field(120.0, ge=0, description="How long a batch waits for an unavailable FM before "
                              "its rows are emitted with the FM mask off.")  # fmt: skip
    labels: LabelJoinConfig | None = Field(None, description="Delayed-label stream; None: labels are in the rows.")
    fault_injection: Literal["after_fm_pass", "after_write"] | None = Field(
        None, description="Tests only: end the process at this point of a window to simulate a crash."
    )


class Augmenter:
    """Augments windows of one stream through a running FM group."""

    def __init__(self, cfg: AugmentConfig):

        self.cfg = cfg
        self.spec = read_spec(cfg.stream)
        self.store = AugmentedStore(cfg.storage)
        self._group = None

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
        """Augment windows in order. The FM pass of every pending window runs as one Ray Data job
        (one labeler pool for the whole range); rows are attached and committed window by window."""
        done = self.store.records()
        pending = [t for t in windows if t not in done]
        version = self._group_version()
        for t in pending:  # refuse before any work, naming the first offending window
            check_no_leakage(version, t, self.spec.window_starts[t])
        start = time.perf_counter()
        labels = self._fm_pass(pending) if pending else {}
        results = []
        for t in windows:
            if t in done:
                result = {"window": t, "status": "already_done", "record": done[t]}
            else:
                result = self._finish(t, labels[t], start)
                start = time.perf_counter()
            results.append(result)
            if progress:
                progress(result)
        return results

    def augment_unlabeled(self, t: int, emb_dim: int) -> dict:
        """Commit window t with the FM mask off on every row: no FM version has trained on data
        before it (the first windows of a stream). Counted as masked rows; nothing is dropped."""
        if t in self.store.records():
            return {"window": t, "status": "already_done", "record": self.store.records()[t]}
        start = time.perf_counter()
        ids = pq.read_table(window_dir(self.cfg.stream, t), columns=["example_id"]).column("example_id")
        unique = pa.array(np.unique(ids.to_numpy()))
        labels = label_table(unique, None, self.spec.tenant_names, emb_dim, int(time.time()))
        return self._finish(t, labels, start)

    def _finish(self, t: int, labels: pa.Table, start: float) -> dict:
        if self.cfg.fault_injection == "after_fm_pass":
            _crash()
        begin, end = self.window_bounds(t)
        events = None
        if self.cfg.labels is not None:
            if label_watermark(self.cfg.labels) < end + self.cfg.labels.attribution_s:
                return {"window": t, "status": "waiting_for_labels", "record": None}
            events = read_events(self.cfg.labels, begin, end)
        record = self._row_pass(t, labels, events, start)
        return {"window": t, "status": "committed", "record": record}

    def _group_version(self) -> FMVersion:
        import ray

        from exfm_ray.fm.registry import FMRegistry

        status = ray.get(self.group.status.remote())
        return FMRegistry(self.cfg.storage).get(status["version"])

    def _fm_labels_path(self, t: int) -> Path:
        return self.store.root / "_fm" / f"window={t}" / "labels.parquet"

    def _fm_pass(self, windows: list[int]) -> dict[int, pa.Table]:
        """FM outputs per unique example of each window, staged on storage (a re-run reuses them)."""
        import ray
        from ray.data import ActorPoolStrategy

        staged = {t: pq.read_table(self._fm_labels_path(t)) for t in windows if self._fm_labels_path(t).exists()}
        todo = [t for t in windows if t not in staged]
        if not todo:
            return staged
        srcs = [str(window_dir(self.cfg.stream, t)) for t in todo]
        keys = pa.concat_tables(pq.read_table(src, columns=["example_id", "tenant", "window"]) for src in srcs)
        first = keys.filter(pa.array(first_occurrence(keys.column("example_id").to_numpy())))
        ds = (
            ray.data.read_parquet(srcs, partitioning=None)
            # Batch before the pool: one big block would be one task, and the pool would sit idle.
            .map_batches(keep_first, fn_args=(first,), batch_format="pyarrow", batch_size=self.cfg.batch_size)
            .map_batches(
                FMLabeler,
                fn_constructor_args=(
                    self.cfg.group_name,
                    self.cfg.group_namespace,
                    self.cfg.max_wait_s,
                    self.spec.tenant_names,
                    self._emb_dim(),
                ),
                batch_size=self.cfg.batch_size,
                batch_format="pyarrow",
                num_cpus=self.cfg.labeler_cpus,
                compute=ActorPoolStrategy(
                    size=self.cfg.labelers, max_tasks_in_flight_per_actor=self.cfg.in_flight_per_labeler
                ),
            )
        )
        labels = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        assert labels.num_rows == first.num_rows, (labels.num_rows, first.num_rows)
        window_of = first.column("window").take(pc.index_in(labels.column("example_id"), first.column("example_id")))
        for t in todo:
            part = labels.filter(pc.equal(window_of, t))
            path = self._fm_labels_path(t)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
            staged[t] = part
        return staged

    def _emb_dim(self) -> int:
        from exfm_ray.fm.model import build_fm

        return build_fm(self._group_version().spec, self._group_version().fm, device="meta").hidden_dim

    def _row_pass(self, t: int, labels: pa.Table, events: pa.Table | None, start: float) -> WindowRecord:
        import ray

        src = str(window_dir(self.cfg.stream, t))
        staged = self.store.staging_dir(uuid.uuid4().hex) / f"window={t}"
        label_cfg = self.cfg.labels.model_dump(mode="json") if self.cfg.labels is not None else None
        (
            ray.data.read_parquet(src, partitioning=None)
            .map_batches(
                attach_labels,
                fn_args=(labels, self.spec.to_json(), label_cfg, events),
                batch_format="pyarrow",
                batch_size=None,
            )
            .write_parquet(str(staged))
        )
        if self.cfg.fault_injection == "after_write":
            _crash()
        written = pq.read_table(staged, columns=["fm_mask", FM_VERSION], partitioning=None)
        input_rows = _rows(src)
        mask = written.column("fm_mask").to_numpy(zero_copy_only=False)
        record = WindowRecord(
            window=t,
            input_rows=input_rows,
            output_rows=written.num_rows,
            fm_calls=labels.num_rows - labels.column(FM_VERSION).null_count,
            fm_versions=sorted({v for v in written.column(FM_VERSION).to_pylist() if v}),
            masked_rows=int((~mask).sum()),
            unlabeled_rows=int(written.column(FM_VERSION).null_count),
            duration_s=round(time.perf_counter() - start, 3),
            label_join=_label_counts(events, t, self) if events is not None else {},
        )
        assert record.output_rows == record.input_rows, record
        self.store.commit(t, staged, record, self.spec)
        _record_metrics(record)
        self._fm_labels_path(t).unlink(missing_ok=True)
        return record


def _record_metrics(rec: WindowRecord) -> None:
    from exfm_ray.observability import LOG, counter, gauge

    # Ray counters accept only positive increments.
    for name, text, value in (
        ("das_rows", "Augmented rows committed by the DAS", rec.output_rows),
        ("das_masked_rows", "Augmented rows with the FM mask off", rec.masked_rows),
        ("das_fm_calls", "Examples the DAS sent to the FM (unique example_ids)", rec.fm_calls),
    ):
        if value > 0:
            counter(name, text).inc(value)
    gauge("das_rows_per_s", "Rows per second of the last committed window").set(
        rec.output_rows / max(rec.duration_s, 1e-9)
    )
    LOG.info(summary_line({"window": rec.window, "status": "committed", "record": rec}))


def _rows(folder: str) -> int:
    return sum(pq.read_metadata(f).num_rows for f in Path(folder).glob("*.parquet"))


def _label_counts(events: pa.Table, t: int, aug: Augmenter) -> dict:
    src = str(window_dir(aug.cfg.stream, t))
    rows = pq.read_table(src, columns=["example_id", "event_time", "tenant", *[f"label_{x}" for x in aug.spec.tasks]])
    assert aug.cfg.labels is not None
    return join_labels(rows, events, aug.spec, aug.cfg.labels)[1]


def _crash() -> None:
    import os

    os._exit(3)


def augment_windows(cfg: AugmentConfig, windows: list[int], progress=None) -> list[dict]:
    """Augment several windows in order; `progress(result)` is called after each."""
    return Augmenter(cfg).augment_range(windows, progress)


def summary_line(result: dict) -> str:
    r = result["record"]
    if r is None:
        return f"window {result['window']}: {result['status']}"
    rec = r if isinstance(r, WindowRecord) else WindowRecord.model_validate(r)
    return (
        f"window {rec.window}: {result['status']}, {rec.output_rows} rows, {rec.fm_calls} FM calls "
        f"({rec.amortization:.2f} per row), FM {','.join(rec.fm_versions) or '-'}, masked {rec.masked_rows}, "
        f"{rec.duration_s:.1f} s"
    )
