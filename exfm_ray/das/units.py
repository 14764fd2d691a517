"""Read units of a stream window: what one DAS worker reads, labels and writes.

The driver plans a window from Parquet footers only (no rows): each unit is a run of consecutive
row groups of one file, about `unit_rows` rows. A worker reads its unit, groups the rows by
example and calls the FM once per example.

The stream writer's layout contract (README "Stream layout"): the rows of one example (one per
tenant that logged it) are contiguous in one file. A unit then owns every example that *starts*
in it: it drops leading rows that continue the previous unit's last example and reads on past
its last row group while its last example continues. So an example straddling a row-group cut is
still labeled once. A writer that breaks the contract loses nothing: an example whose rows sit
in two units is labeled twice (same version, same outputs), counted in the window's `fm_calls`.

Torch-free: DAS workers import this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exfm_ray.data.stream import window_dir

UNIT_FIELDS = ("window", "file", "rg_start", "rg_end", "index")


def window_files(stream: str | Path, t: int) -> list[Path]:
    """The window's Parquet files in name order (hidden names are writes in progress)."""
    return sorted(p for p in window_dir(stream, t).glob("*.parquet") if not p.name.startswith("."))


def plan_window(stream: str | Path, t: int, unit_rows: int) -> tuple[list[dict], int]:
    """(units, rows) of window t from the files' footers. A window without rows still gets one
    (empty) unit, so that its committed folder holds a file with the augmented schema."""
    units: list[dict] = []
    total = 0
    for path in window_files(stream, t):
        meta = pq.ParquetFile(path).metadata
        start, rows = 0, 0
        for rg in range(meta.num_row_groups):
            rows += meta.row_group(rg).num_rows
            if rows >= unit_rows or rg == meta.num_row_groups - 1:
                units.append(_unit(t, path, start, rg + 1, len(units)))
                total += rows
                start, rows = rg + 1, 0
    if not units:
        files = window_files(stream, t)
        units.append(_unit(t, files[0], 0, 0, 0))
    return units, total


def _unit(t: int, path: Path, start: int, end: int, index: int) -> dict:
    return {"window": t, "file": str(path), "rg_start": start, "rg_end": end, "index": index}


def read_unit(unit: dict, columns: list[str] | None = None) -> pa.Table:
    """The unit's rows: its row groups minus a leading continuation of the previous unit's last
    example, plus the continuation of its own last example into the next row groups."""
    pf = pq.ParquetFile(unit["file"])
    start, end = unit["rg_start"], unit["rg_end"]
    table = pf.read_row_groups(range(start, end), columns=columns)
    if start > 0 and table.num_rows:
        previous = pf.read_row_group(start - 1, columns=["example_id"]).column("example_id")
        table = table.slice(_leading_run(table.column("example_id"), previous[-1].as_py()))
    if table.num_rows == 0:
        return table
    last = table.column("example_id")[-1].as_py()
    tail = []
    for rg in range(end, pf.metadata.num_row_groups):
        ids = pf.read_row_group(rg, columns=["example_id"]).column("example_id")
        k = _leading_run(ids, last)
        if k:
            tail.append(pf.read_row_group(rg, columns=columns).slice(0, k))
        if k < len(ids):
            break
    return pa.concat_tables([table, *tail]) if tail else table


def _leading_run(ids: pa.ChunkedArray, value: int) -> int:
    """How many leading entries of `ids` equal `value`."""
    differs = np.flatnonzero(ids.to_numpy() != value)
    return int(differs[0]) if len(differs) else len(ids)


def example_batches(table: pa.Table, batch_size: int) -> list[pa.Table]:
    """Rows grouped by example_id (examples in order of their first row), cut every `batch_size`
    examples: a batch holds every row of its examples."""
    ids = table.column("example_id").to_numpy()
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    example = rank[inverse]
    order = np.argsort(example, kind="stable")
    grouped = table.take(pa.array(order))
    cuts = np.searchsorted(example[order], np.arange(0, len(first), batch_size)).tolist() + [len(ids)]
    return [grouped.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def max_event_time(stream: str | Path, t: int) -> int:
    """The window's last event time, from row-group statistics where the writer kept them."""
    best = None
    for path in window_files(stream, t):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            chunks = [group.column(i) for i in range(group.num_columns)]
            stats = next(c.statistics for c in chunks if c.path_in_schema == "event_time")
            if stats is None or not stats.has_min_max:
                col = pq.read_table(path, columns=["event_time"]).column("event_time")
                value = pc.max(col).as_py()
            else:
                value = stats.max
            best = value if best is None else max(best, value)
    return int(best) if best is not None else 0
