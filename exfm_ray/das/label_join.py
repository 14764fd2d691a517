"""Delayed labels: a separate stream of label events joined to rows by example_id.

A label event (example_id, task, label_time) says the example converted on `task` at
label_time. A row's label for a task is 1 if an event arrives within the attribution window
(0 <= label_time - event_time <= attribution_s), else the window closes without one and the row
gets `unlabeled` (default 0, a negative). Events after the attribution window are late: they do
not count, and are counted. A window can be finalized only once the label stream has passed
its end + attribution_s; FM labeling does not wait for that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.schema import StreamSpec, label_column

WATERMARK_FILE = "WATERMARK"
EVENT_SCHEMA = pa.schema([("example_id", pa.int64()), ("task", pa.string()), ("label_time", pa.int64())])


class LabelJoinConfig(Config):
    path: str = Field(description="Folder of label-event Parquet files (example_id, task, label_time).")
    attribution_s: int = Field(86_400, gt=0, description="Attribution window after the event time, seconds.")
    unlabeled: Literal["negative", "null"] = Field(
        "negative", description="Label of a row whose event never arrived once its window closed."
    )


def read_events(cfg: LabelJoinConfig, start: int, end: int, example_ids: pa.Array | None = None) -> pa.Table:
    """Events that can belong to rows logged in [start, end) (of these examples only, if given)."""
    if not Path(cfg.path).exists():
        return EVENT_SCHEMA.empty_table()
    ds = pds.dataset(cfg.path, format="parquet", schema=EVENT_SCHEMA, exclude_invalid_files=True)
    time = pds.field("label_time")
    where = (time >= start) & (time < end + cfg.attribution_s)
    if example_ids is not None:
        where = where & pds.field("example_id").isin(example_ids)
    return ds.to_table(filter=where)


def label_watermark(cfg: LabelJoinConfig) -> int:
    """How far the label stream is complete: its WATERMARK file (unix seconds, written by the
    label pipeline as it advances, heartbeats included), else the latest event seen."""
    folder = Path(cfg.path)
    if (folder / WATERMARK_FILE).exists():
        return int((folder / WATERMARK_FILE).read_text().strip())
    if not folder.exists():
        return -1
    table = pds.dataset(cfg.path, format="parquet", schema=EVENT_SCHEMA, exclude_invalid_files=True).to_table(
        columns=["label_time"]
    )
    return int(pc.max(table.column("label_time")).as_py()) if table.num_rows else -1


def join_labels(rows: pa.Table, events: pa.Table, spec: StreamSpec, cfg: LabelJoinConfig) -> tuple[pa.Table, dict]:
    """Fill label_<task> of every row from the events; returns the rows and the counts."""
    counts = {"positive": 0, "negative": 0, "late_events": 0, "unlabeled": 0}
    event_time = rows.column("event_time").to_numpy()
    ids = rows.column("example_id")
    for task in spec.tasks:
        ev = events.filter(pc.equal(events.column("task"), task))
        # Earliest event per example: a click counts once.
        ev = ev.group_by("example_id").aggregate([("label_time", "min")]) if ev.num_rows else ev
        pos = (
            pc.index_in(ids, value_set=ev.column("example_id")) if ev.num_rows else pa.nulls(rows.num_rows, pa.int32())
        )
        found = pc.is_valid(pos).to_numpy(zero_copy_only=False)
        when = np.full(rows.num_rows, -1, np.int64)
        if found.any():
            times = ev.column("label_time_min" if "label_time_min" in ev.column_names else "label_time")
            when[found] = times.take(pc.drop_null(pos)).to_numpy()
        delay = when - event_time
        in_window = found & (delay >= 0) & (delay <= cfg.attribution_s)
        late = found & ~in_window
        counts["positive"] += int(in_window.sum())
        counts["late_events"] += int(late.sum())
        if cfg.unlabeled == "negative":
            values = pa.array(in_window.astype(np.float32))
            counts["negative"] += int((~in_window).sum())
        else:
            values = pa.array(np.where(in_window, 1.0, np.nan).astype(np.float32), from_pandas=True)
            counts["unlabeled"] += int((~in_window).sum())
        name = label_column(task)
        rows = rows.set_column(rows.schema.get_field_index(name), name, values)
    return rows, counts


def delayed_events(table: pa.Table, spec: StreamSpec, mean_delay_s: float, seed: int = 0) -> pa.Table:
    """Turn a labeled window into label events with exponential delays (simulation and tests)."""
    rng = np.random.default_rng(seed)
    parts = []
    for task in spec.tasks:
        y = pc.fill_null(table.column(label_column(task)), 0.0).to_numpy()
        keep = y == 1.0
        ids = table.column("example_id").to_numpy()[keep]
        ids, first = np.unique(ids, return_index=True)  # overlapped rows share one event
        t = table.column("event_time").to_numpy()[keep][first]
        delay = rng.exponential(mean_delay_s, len(ids)).astype(np.int64)
        parts.append(pa.table({"example_id": ids, "task": [task] * len(ids), "label_time": t + delay}, EVENT_SCHEMA))
    return pa.concat_tables(parts)
