"""MovieLens-100K replayed as a weekly multi-tenant click stream.

- Label: label_click = 1 if rating >= 4 else 0 (positive rate 0.5537).
- Order: rows sorted by timestamp, stable, so ties keep file order. example_id is the row's
  0-based position in ml-100k.inter, so it joins back to the raw file.
- Windows: 7-day windows counted from 00:00 UTC of the first rating's day (1997-09-20, a
  Saturday): 31 windows, the last one 5 days long. No window is empty (the smallest holds
  1,150 rows), so nothing is merged; build_stream fails loudly if a gap ever left one empty.
- Tenants: one per group of user occupations (OCCUPATION_GROUPS). Each user has one occupation,
  so each rating lands on exactly one tenant; there is no overlap.
- Features (ids from a sorted vocabulary over the side tables, so they do not depend on the log):
  user_id, item_id, age_bucket (7 MovieLens-1M age bands), gender, occupation, zip_prefix (first
  digit of the zip code, "non_us" for the few non-numeric codes), genres (multi-valued),
  release_decade. No dense features. The FM sees all of them; students see STUDENT_FEATURES,
  leaving out occupation, zip_prefix and release_decade.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from exfm_ray.data.stream import LoadReport, Stream, build_stream, id_lists, single_ids, windows_by_period
from exfm_ray.errors import ConfigError, DataError
from exfm_ray.schema import SparseFeature, StreamSpec, TenantSpec, arrow_schema

FOLDER = "movielens_100k"
INTER, USER, ITEM = "ml-100k.inter.gz", "ml-100k.user.gz", "ml-100k.item.gz"
DAY_S = 86_400

# Groups of roughly equal traffic (rows of the log): student 21,957, technical 21,540,
# academic 20,251, other 36,252. Any occupation not named falls into "other".
OCCUPATION_GROUPS: dict[str, tuple[str, ...]] = {
    "student": ("student",),
    "technical": ("engineer", "programmer", "technician", "scientist"),
    "academic": ("educator", "librarian", "writer"),
}
OTHER = "other"
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # bands <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
STUDENT_FEATURES = ["user_id", "item_id", "genres", "age_bucket", "gender"]


def movielens_stream(data_dir: Path, num_tenants: int | None = None, window_days: int = 7) -> Stream:
    """Load MovieLens-100K as a stream.

    data_dir is the folder holding `movielens_100k/` (or that folder itself). num_tenants
    (1..4, default 4) keeps the first num_tenants - 1 occupation groups and folds the rest into
    "other"; 1 gives a single tenant "all". window_days sets the window length (7: weekly).
    """
    folder = _folder(Path(data_dir))
    n_groups = len(OCCUPATION_GROUPS) + 1
    if num_tenants is None:
        num_tenants = n_groups
    if not 1 <= num_tenants <= n_groups:
        raise ConfigError(f"num_tenants must be in 1..{n_groups} for MovieLens, got {num_tenants}")

    inter = _read(folder / INTER)
    users = _read(folder / USER, dtype=str)
    items = _read(folder / ITEM, dtype=str)

    ts = inter["timestamp:float"].to_numpy(np.int64)
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    user_raw = inter["user_id:token"].to_numpy(np.int64)[order]
    item_raw = inter["item_id:token"].to_numpy(np.int64)[order]
    rating = inter["rating:float"].to_numpy(np.float64)[order]

    user_keys = users["user_id:token"].astype(np.int64).to_numpy()
    item_keys = items["item_id:token"].astype(np.int64).to_numpy()
    u_row = _lookup(user_keys, user_raw, "user_id:token", order)
    i_row = _lookup(item_keys, item_raw, "item_id:token", order)

    start = int(ts[0]) // DAY_S * DAY_S
    period = window_days * DAY_S
    window = windows_by_period(ts, start, period)
    num_windows = int(window[-1]) + 1

    occupation = users["occupation:token"].to_numpy(str)
    tenant_of_user, tenant_names = _tenants(occupation, num_tenants)

    age = users["age:token"].astype(np.int64).to_numpy()
    zip_first = users["zip_code:token"].str[:1].to_numpy(str)
    zip_prefix = np.where(np.char.isdigit(zip_first), zip_first, "non_us")
    year = pd.to_numeric(items["release_year:token"], errors="coerce").to_numpy()
    decade = np.where(np.isnan(year), "", (np.nan_to_num(year) // 10 * 10).astype(np.int64).astype(str))

    side_user = {
        "user_id": _ids(user_keys),
        "age_bucket": (np.searchsorted(AGE_EDGES, age, side="right"), len(AGE_EDGES) + 1),
        "gender": _ids(users["gender:token"].to_numpy(str)),
        "occupation": _ids(occupation),
        "zip_prefix": _ids(zip_prefix),
    }
    side_item = {"item_id": _ids(item_keys)}
    release_ids, release_card = _ids(decade)

    columns: dict[str, pa.Array] = {}
    cards: dict[str, int] = {}
    for name, (ids, card) in side_user.items():
        columns[name], cards[name] = single_ids(ids[u_row]), card
    for name, (ids, card) in side_item.items():
        columns[name], cards[name] = single_ids(ids[i_row]), card
    # An unknown release year gives an empty list rather than an id of its own.
    release_has = decade[i_row] != ""
    columns["release_decade"] = id_lists(release_ids[i_row][release_has], release_has.astype(np.int64))
    cards["release_decade"] = release_card
    g_offsets, g_values, cards["genres"] = _genres(items["class:token_seq"])
    columns["genres"] = _gather_lists(g_offsets, g_values, i_row)

    sparse = [
        SparseFeature(name=name, cardinality=max(cards[name], 1), multi_valued=name == "genres")
        for name in ("user_id", "item_id", "age_bucket", "gender", "occupation", "zip_prefix", "genres")
    ]
    sparse.append(SparseFeature(name="release_decade", cardinality=max(cards["release_decade"], 1)))
    spec = StreamSpec(
        name="movielens",
        description=(
            "MovieLens-100K ratings, label_click = rating >= 4. Rows sorted by timestamp (stable); "
            f"{num_windows} windows of {window_days} days from 00:00 UTC of the first rating's day, "
            "the last one partial. "
            f"Tenants = user occupation groups {_describe_groups(tenant_names)}; no overlap. "
            f"Students see {', '.join(STUDENT_FEATURES)}; the FM also sees occupation, zip_prefix, release_decade."
        ),
        sparse=sparse,
        dense=[],
        tasks=["click"],
        tenants=[TenantSpec(name=t, features=list(STUDENT_FEATURES)) for t in tenant_names],
        window_starts=[start + t * period for t in range(num_windows)],
    )
    data = {
        "example_id": order.astype(np.int64),
        "event_time": ts,
        "window": window,
        "tenant": np.asarray(tenant_names, dtype=object)[tenant_of_user[u_row]],
        "label_click": (rating >= 4).astype(np.float32),
        **columns,
    }
    schema = arrow_schema(spec)
    table = pa.table({f.name: data[f.name] for f in schema}, schema=schema)
    return build_stream(table, spec, LoadReport(rows_read=len(ts)))


def _folder(data_dir: Path) -> Path:
    for candidate in (data_dir / FOLDER, data_dir):
        if (candidate / INTER).exists():
            return candidate
    raise DataError(f"MovieLens-100K not found: no {FOLDER}/{INTER} under {data_dir}")


def _read(path: Path, dtype: type | None = None) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"missing file {path}")
    # na_filter off: a title or genre like "NA" is a value, not a missing one.
    return pd.read_csv(path, sep="\t", dtype=dtype, na_filter=False)


def _lookup(keys: np.ndarray, values: np.ndarray, column: str, order: np.ndarray) -> np.ndarray:
    """Row of each value in the side table; DataError names the first log row with no match."""
    sorter = np.argsort(keys, kind="stable")
    pos = np.clip(np.searchsorted(keys, values, sorter=sorter), 0, len(keys) - 1)
    rows = sorter[pos]
    bad = keys[rows] != values
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{values[i]} has no row in the side table", column=column, row=int(order[i]))
    return rows


def _ids(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Contiguous ids from the sorted vocabulary of the values; the empty string gets no id of its own."""
    vocab = np.unique(values[values != ""]) if values.dtype.kind in "US" else np.unique(values)
    ids = np.searchsorted(vocab, values)
    return ids.astype(np.int64), len(vocab)


def _tenants(occupation: np.ndarray, num_tenants: int) -> tuple[np.ndarray, list[str]]:
    if num_tenants == 1:
        return np.zeros(len(occupation), np.int64), ["all"]
    named = list(OCCUPATION_GROUPS)[: num_tenants - 1]
    tenant = np.full(len(occupation), len(named), np.int64)
    for i, group in enumerate(named):
        tenant[np.isin(occupation, OCCUPATION_GROUPS[group])] = i
    return tenant, [*named, OTHER]


def _describe_groups(names: list[str]) -> str:
    parts = [f"{n} ({', '.join(OCCUPATION_GROUPS[n])})" for n in names if n in OCCUPATION_GROUPS]
    if OTHER in names:
        parts.append(f"{OTHER} (every other occupation)")
    if names == ["all"]:
        parts.append("all (one tenant)")
    return "; ".join(parts)


def _genres(class_seq: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-item genre ids as CSR (offsets, values) over a sorted genre vocabulary."""
    tokens = class_seq.str.split()
    lengths = tokens.str.len().fillna(0).to_numpy(np.int64)
    flat = tokens.explode().dropna().to_numpy(str)
    vocab = np.unique(flat)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return offsets, np.searchsorted(vocab, flat).astype(np.int64), len(vocab)


def _gather_lists(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> pa.ListArray:
    """List array whose i-th list is values[offsets[rows[i]]:offsets[rows[i] + 1]], without a Python loop."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    out_offsets = np.concatenate([[0], np.cumsum(lengths)])
    # Position j of the output reads values[starts[row of j] + (j - out_offsets[row of j])].
    idx = np.repeat(starts - out_offsets[:-1], lengths) + np.arange(out_offsets[-1])
    return pa.ListArray.from_arrays(pa.array(out_offsets.astype(np.int32)), pa.array(values[idx]))
