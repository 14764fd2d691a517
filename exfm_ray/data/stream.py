"""A stream = a spec plus time-ordered windows; windows are Parquet partitions on disk.

Layout of a stream folder (hive-style, so Ray Data and any Parquet reader see `window`):

    <root>/spec.json
    <root>/window=0/part-0.parquet
    <root>/window=1/part-0.parquet
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exfm_ray.errors import DataError
from exfm_ray.schema import StreamSpec, validate_table

SPEC_FILE = "spec.json"


@dataclass
class LoadReport:
    """What loading did to the input: nothing is dropped without being counted here."""

    rows_read: int
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        return self.rows_read - sum(self.excluded.values())

    def summary(self) -> str:
        if not self.excluded:
            return f"{self.rows_read} rows read, none excluded"
        parts = ", ".join(f"{n} {why}" for why, n in self.excluded.items())
        return f"{self.rows_read} rows read, {self.rows_kept} kept; excluded: {parts}"


STREAM_ROW_GROUP_ROWS = 65_536  # a DAS worker reads whole row groups: this bounds what one reads


def examples_together(table: pa.Table) -> pa.Table:
    """The rows of each example moved next to its first row (a stable reorder; a table already in
    that layout comes back as is)."""
    ids = table.column("example_id").to_numpy()
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    if len(ids) == 0 or np.count_nonzero(ids[1:] != ids[:-1]) + 1 == len(first):
        return table
    return table.take(pa.array(np.argsort(first[inverse], kind="stable")))


@dataclass
class Stream:
    spec: StreamSpec
    windows: list[pa.Table]
    report: LoadReport

    @property
    def num_rows(self) -> int:
        return sum(w.num_rows for w in self.windows)

    def tenant_rows(self, window: int, tenant: str) -> pa.Table:
        table = self.windows[window]
        return table.filter(pc.equal(table.column("tenant"), tenant))

    def write(self, root: str | Path, row_group_rows: int = STREAM_ROW_GROUP_ROWS) -> Path:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / SPEC_FILE).write_text(self.spec.to_json())
        for t, table in enumerate(self.windows):
            write_window(root, t, table, row_group_rows)
        return root


def window_dir(root: str | Path, t: int) -> Path:
    return Path(root) / f"window={t}"


def write_window(root: str | Path, t: int, table: pa.Table, row_group_rows: int = STREAM_ROW_GROUP_ROWS) -> Path:
    """Written under a hidden name, then renamed: a reader (the DAS, a following FM job) sees the
    window whole or not at all (Parquet readers skip names starting with '.'). The rows of one
    example are written together (the DAS's layout contract, README "Stream layout")."""
    table = examples_together(table)
    folder = window_dir(root, t)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.parquet"
    tmp = folder / f".part-0.parquet.{os.getpid()}"
    pq.write_table(table, tmp, row_group_size=row_group_rows)
    os.replace(tmp, path)
    return path


def window_ready(root: str | Path, t: int) -> bool:
    """The stream writer's contract: a window is complete once a `*.parquet` file is in its folder
    (each written under a hidden name and renamed, as `write_window` does)."""
    folder = window_dir(root, t)
    return folder.is_dir() and any(folder.glob("*.parquet"))


def read_spec(root: str | Path) -> StreamSpec:
    path = Path(root) / SPEC_FILE
    if not path.exists():
        raise DataError(f"{root} is not a stream folder: no {SPEC_FILE}")
    return StreamSpec.from_json(path.read_text())


def read_window(root: str | Path, t: int, spec: StreamSpec | None = None) -> pa.Table:
    folder = window_dir(root, t)
    if not folder.exists():
        raise DataError(f"window {t} not found under {root}")
    table = pq.read_table(folder, partitioning=None)
    return validate_table(table, spec) if spec is not None else table


def read_stream(root: str | Path) -> Stream:
    spec = read_spec(root)
    windows = [read_window(root, t, spec) for t in range(spec.num_windows)]
    return Stream(spec, windows, LoadReport(rows_read=sum(w.num_rows for w in windows)))


def id_lists(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """list<int64> column from flat ids and per-row list lengths."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values, dtype=np.int64)))


def single_ids(values: np.ndarray) -> pa.ListArray:
    """list<int64> column with exactly one id per row."""
    return id_lists(values, np.ones(len(values), np.int64))


def windows_by_count(event_time: np.ndarray, num_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort rows stably by time and cut them into equal-count windows.

    Returns (order, window index per sorted row). Ties keep input order, so a log with equal
    timestamps (or no time at all) is windowed in file order.
    """
    n = len(event_time)
    if num_windows < 1:
        raise DataError(f"windows must be >= 1, got {num_windows}", column="windows")
    if n < num_windows:
        raise DataError(f"{n} rows cannot fill {num_windows} windows: a window would be empty")
    order = np.argsort(event_time, kind="stable")
    window = (np.arange(n) * num_windows // n).astype(np.int32)
    return order, window


def windows_by_period(event_time: np.ndarray, start: int, period_s: int) -> np.ndarray:
    """Fixed-length windows (e.g. weeks) counted from `start`."""
    return ((event_time - start) // period_s).astype(np.int32)


def build_stream(table: pa.Table, spec: StreamSpec, report: LoadReport) -> Stream:
    """Validate a table that already carries a `window` column and split it into windows.

    The table must be sorted by event time. Every window in the spec must hold rows.
    """
    table = validate_table(table, spec)
    window = table.column("window").to_numpy()
    if len(window) and np.any(np.diff(window) < 0):
        raise DataError("rows are not in window order", column="window")
    bounds = np.searchsorted(window, np.arange(spec.num_windows + 1), side="left")
    windows = []
    for t in range(spec.num_windows):
        lo, hi = int(bounds[t]), int(bounds[t + 1])
        if hi == lo:
            raise DataError(f"window {t} is empty (starts at unix time {spec.window_starts[t]})", column="window")
        windows.append(table.slice(lo, hi - lo))
    if int(bounds[-1]) != table.num_rows:
        raise DataError(f"rows beyond the last window {spec.num_windows - 1}", column="window")
    return Stream(spec, windows, report)
