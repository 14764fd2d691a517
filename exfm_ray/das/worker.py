"""The DAS worker: a Ray Data actor that reads one unit of a stream window, labels it through the
FM group and writes it as one Parquet part of the window's staging folder.

The driver never holds rows: it sends units (a file and a row-group range, `das/units.py`) and
gets back counts. A unit's part has a fixed name (`part-<index>.parquet`, written under a hidden
name and renamed), so a unit that Ray Data runs again after a worker or node was lost replaces
its own part: no row twice, none lost. Several units run at once per worker (their reads and
writes overlap the FM calls of the others), and the FM calls of all of them share a bounded
pool of threads: at most `in_flight` calls per worker wait on the FM group at a time.

Torch-free on purpose, like `das/transforms.py`: every Ray Data worker imports this module.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exfm_ray.das.columns import FM_VERSION, attach, first_occurrence, label_columns, label_table
from exfm_ray.das.label_join import LabelJoinConfig, join_labels, read_events
from exfm_ray.das.store import parquet_options
from exfm_ray.das.units import example_batches, read_unit
from exfm_ray.schema import StreamSpec

ROW_GROUP_ROWS = 32_768  # augmented rows per Parquet row group
JOIN_KEYS = ("positive", "negative", "late_events", "unlabeled")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def staged_labels_dir(store_root: str | Path, t: int) -> Path:
    """FM outputs of a window that waits for its delayed labels, one file per unit."""
    return Path(store_root) / "_fm" / f"window={t}"


class DASWorker:
    """Ray Data UDF over units (one row per call). `settings`: the AugmentConfig fields a worker
    needs, as a dict (the config module itself imports torch)."""

    def __init__(self, settings: dict, spec_json: str, emb_dim: int, staging: str, store_root: str):
        self.s = settings
        self.spec = StreamSpec.from_json(spec_json)
        self.emb_dim = emb_dim
        self.staging = Path(staging)
        self.store_root = store_root
        self.labels_cfg = LabelJoinConfig.model_validate(settings["labels"]) if settings["labels"] else None
        self.pool = ThreadPoolExecutor(settings["in_flight"])
        self._labeler = None
        self._lock = threading.Lock()

    def labeler(self):
        """The FM group's client, made on first use (units whose FM mask stays off need none)."""
        from exfm_ray.das.transforms import FMLabeler

        with self._lock:
            if self._labeler is None:
                s = self.s
                self._labeler = FMLabeler(
                    s["group_name"], s["group_namespace"], s["max_wait_s"], self.spec.to_json(), self.emb_dim
                )
            return self._labeler

    def __call__(self, batch: pa.Table) -> pa.Table:
        unit = batch.to_pylist()[0]
        clock = {"read_s": 0.0, "label_s": 0.0, "write_s": 0.0}
        mark = time.perf_counter()
        table = read_unit(unit)
        clock["read_s"] = time.perf_counter() - mark
        parts = self._augmented(unit, table, clock)
        counts = {"rows": 0, "fm_calls": 0, "masked": 0, "unlabeled": 0, **{f"join_{k}": 0 for k in JOIN_KEYS}}
        versions: set[str] = set()
        if unit["waiting"]:
            self._stage_labels(unit, parts, counts, versions, clock)
        else:
            self._write(unit, table, parts, counts, versions, clock)
        row = {"window": unit["window"], "index": unit["index"], **counts, "versions": ",".join(sorted(versions))}
        return pa.Table.from_pylist([{**row, **{k: round(v, 4) for k, v in clock.items()}}])

    def _augmented(self, unit: dict, table: pa.Table, clock: dict):
        """The unit's rows with FM outputs, in batches, as they come back."""
        if unit["mode"] == "staged":
            staged = staged_labels_dir(self.store_root, unit["window"]) / part_name(unit["index"])
            yield attach(table, pq.read_table(staged), self.spec)
            return
        if unit["mode"] == "null" or table.num_rows == 0:
            ids = pa.array(np.unique(table.column("example_id").to_numpy()), pa.int64())
            nulls = label_table(ids, None, self.spec.tenant_names, self.emb_dim, int(time.time()))
            yield attach(table, nulls, self.spec)
            return
        labeler = self.labeler()
        futures = [self.pool.submit(labeler, b) for b in example_batches(table, self.s["batch_size"])]
        for future in futures:
            mark = time.perf_counter()
            out = future.result()
            clock["label_s"] += time.perf_counter() - mark
            yield out

    def _write(self, unit: dict, table: pa.Table, parts, counts: dict, versions: set, clock: dict) -> None:
        events = None
        if self.labels_cfg is not None:
            ids = table.column("example_id").combine_chunks()
            events = read_events(self.labels_cfg, unit["begin"], unit["end"], example_ids=ids)
        tmp, final = _part_paths(self.staging / f"window={unit['window']}", unit["index"])
        writer, buffer = None, []
        for rows in parts:
            _count(rows, counts, versions)
            mark = time.perf_counter()
            if events is not None:
                rows, joined = join_labels(rows, events, self.spec, self.labels_cfg)
                for key, n in joined.items():
                    counts[f"join_{key}"] += n
            buffer.append(rows)
            if sum(b.num_rows for b in buffer) >= ROW_GROUP_ROWS:
                writer = _flush(writer, tmp, buffer)
            clock["write_s"] += time.perf_counter() - mark
        mark = time.perf_counter()
        writer = _flush(writer, tmp, buffer)
        writer.close()
        os.replace(tmp, final)
        clock["write_s"] += time.perf_counter() - mark

    def _stage_labels(self, unit: dict, parts, counts: dict, versions: set, clock: dict) -> None:
        """Keep only the FM outputs per example: the rows are written once the labels close."""
        kept = []
        for rows in parts:
            _count(rows, counts, versions)
            kept.append(rows.filter(pa.array(first_occurrence(rows.column("example_id").to_numpy()))))
        mark = time.perf_counter()
        tmp, final = _part_paths(staged_labels_dir(self.store_root, unit["window"]), unit["index"])
        pq.write_table(pa.concat_tables(kept).select(label_columns(self.spec.tenant_names)), tmp)
        os.replace(tmp, final)
        clock["write_s"] += time.perf_counter() - mark


def _part_paths(folder: Path, index: int) -> tuple[Path, Path]:
    """(hidden name to write, final name): readers skip the hidden one until the rename, and a unit
    run again writes under its own hidden name and replaces the same final part."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / part_name(index)
    return folder / f".{final.name}.{os.getpid()}.{threading.get_ident()}", final


def _count(rows: pa.Table, counts: dict, versions: set) -> None:
    version = rows.column(FM_VERSION)
    labeled = rows.column("example_id").filter(version.is_valid()) if version.null_count else rows["example_id"]
    counts["rows"] += rows.num_rows
    counts["fm_calls"] += len(np.unique(labeled.to_numpy()))
    counts["masked"] += rows.num_rows - int(pc.sum(rows.column("fm_mask")).as_py() or 0)
    counts["unlabeled"] += version.null_count
    versions |= {v for v in pc.unique(version).to_pylist() if v}


def _flush(writer, path: Path, buffer: list[pa.Table]):
    """Write the buffered rows as row groups (an empty unit still gets its file and schema)."""
    if not buffer:
        return writer
    table = pa.concat_tables(buffer)
    buffer.clear()
    if writer is None:
        writer = pq.ParquetWriter(path, table.schema, **parquet_options(table.schema))
    if table.num_rows:
        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    return writer
