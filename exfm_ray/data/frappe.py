"""Frappe (validation + test parts of Frappe_x1) as a multi-tenant stream with pseudo-time.

Frappe has no time column, so the stream order is imposed, not observed:

- Order: validation rows, then test rows, each in file order. The original 70/20/10 split was
  random, so this is a random order; "drift" across windows is only sampling noise. Use the
  stream for pipeline and distillation checks, not for claims about temporal drift.
- Time: event_time is a pseudo-time, the row's position in that order in seconds (row p logs at
  unix second p, one second apart); window_starts are the positions of each window's first row.
- Windows: `num_windows` equal-count windows (86,582 rows / 10 = 8,658 or 8,659 per window).
- Tenants: one per value of the `homework` context field, named by its local index: homework_0
  (68,088 rows), homework_1 (14,172), homework_2 (4,322). The libFM files only keep indices, so
  which index is home / work / unknown cannot be recovered; homework_0 is the big one, presumably
  "unknown". Every row has one tenant (no overlap). Positive rate is ~0.33 in each by construction.
- Features: all 10 fields as single-valued sparse features with the README's cardinalities (ids are
  the local indices, already contiguous). Students see STUDENT_FEATURES; the FM also sees
  isweekend, homework, cost and city. example_id is the row's 0-based position in
  frappe_fields.csv.gz. Labels: 1 = real usage log, 0 = sampled negative.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from exfm_ray.data.stream import LoadReport, Stream, build_stream, single_ids, windows_by_count
from exfm_ray.errors import DataError
from exfm_ray.schema import SparseFeature, StreamSpec, TenantSpec, arrow_schema

FOLDER = "frappe"
FILE = "frappe_fields.csv.gz"
SPLIT_ORDER = ("validation", "test")
CARDINALITY = {
    "user": 957,
    "item": 4082,
    "daytime": 7,
    "weekday": 7,
    "isweekend": 2,
    "homework": 3,
    "cost": 2,
    "weather": 9,
    "country": 80,
    "city": 233,
}
TENANT_FIELD = "homework"
STUDENT_FEATURES = ["user", "item", "daytime", "weekday", "weather", "country"]


def frappe_stream(data_dir: Path, num_windows: int = 10) -> Stream:
    """Load Frappe as a stream; data_dir holds `frappe/` (or is that folder itself)."""
    path = _file(Path(data_dir))
    frame = pd.read_csv(path)
    missing = [c for c in ("split", "label", *CARDINALITY) if c not in frame.columns]
    if missing:
        raise DataError(f"not in {path.name}; columns are {list(frame.columns)}", column=missing[0])
    split_rank = frame["split"].map({s: i for i, s in enumerate(SPLIT_ORDER)})
    if split_rank.isna().any():
        row = int(np.flatnonzero(split_rank.isna().to_numpy())[0])
        raise DataError(
            f"split must be one of {SPLIT_ORDER}, got {frame['split'].iloc[row]!r}", column="split", row=row
        )
    # Stable sort by split: a no-op on the shipped file, which already lists validation first.
    order = np.argsort(split_rank.to_numpy(np.int64), kind="stable")
    n = len(order)
    pseudo_time = np.arange(n, dtype=np.int64)
    _, window = windows_by_count(pseudo_time, num_windows)
    starts = np.searchsorted(window, np.arange(num_windows))

    tenant_values = frame[TENANT_FIELD].to_numpy(np.int64)[order]
    tenant_names = [f"{TENANT_FIELD}_{v}" for v in range(CARDINALITY[TENANT_FIELD])]
    sparse = [SparseFeature(name=name, cardinality=card) for name, card in CARDINALITY.items()]
    spec = StreamSpec(
        name="frappe",
        description=(
            "Frappe_x1 validation+test rows (label 1 = real usage, 0 = sampled negative). No real time: "
            "rows ordered validation then test, each in file order (a random order, the split being random); "
            f"event_time = row position in seconds (pseudo-time); {num_windows} equal-count windows. "
            f"Tenants = value of the '{TENANT_FIELD}' context field ({', '.join(tenant_names)}; index names "
            f"unknown); no overlap. Students see {', '.join(STUDENT_FEATURES)}; the FM sees all 10 fields."
        ),
        sparse=sparse,
        dense=[],
        tasks=["click"],
        tenants=[TenantSpec(name=t, features=list(STUDENT_FEATURES)) for t in tenant_names],
        window_starts=[int(pseudo_time[s]) for s in starts],
    )
    data = {
        "example_id": order.astype(np.int64),
        "event_time": pseudo_time,
        "window": window,
        "tenant": np.asarray(tenant_names, dtype=object)[np.clip(tenant_values, 0, len(tenant_names) - 1)],
        "label_click": frame["label"].to_numpy(np.float32)[order],
    }
    for name in CARDINALITY:
        # Out-of-range ids are left for validate_table, which names the column and row.
        data[name] = single_ids(frame[name].to_numpy(np.int64)[order])
    schema = arrow_schema(spec)
    table = pa.table({f.name: data[f.name] for f in schema}, schema=schema)
    return build_stream(table, spec, LoadReport(rows_read=n))


def _file(data_dir: Path) -> Path:
    for candidate in (data_dir / FOLDER / FILE, data_dir / FILE):
        if candidate.exists():
            return candidate
    raise DataError(f"Frappe not found: no {FOLDER}/{FILE} under {data_dir}")
