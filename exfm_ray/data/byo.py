"""Bring your own data: a CSV/TSV/Parquet file plus a YAML mapping that names the columns' roles.

Rules (what the loader does to the input):

- Files: .csv, .tsv, .txt (comma- or tab-separated, header line required, separator sniffed from
  the header unless .tsv) and .parquet / .pq, each optionally gzipped (.gz).
- Row numbers in errors are 0-based data rows of the input file (the header line is not counted).
- Missing values: a null, or a string that is empty after stripping whitespace. Values are
  stripped. Categorical: missing -> empty id list (the row is kept). Dense: missing or NaN -> 0.0
  (the count per column is written into the spec description). Label, time or tenant missing ->
  the row is excluded and counted in LoadReport.excluded under the first reason that applies
  ("label missing", "time missing", "tenant missing"); nothing else is ever dropped.
- Label: a number equal to 0 or 1 (or a boolean); anything else raises DataError.
- Time: unix seconds (numbers, floored), datetime strings, or a Parquet timestamp/date column.
  Without time_format the first present value decides: a number means every time must be a
  number; otherwise every string must parse with the one format pandas infers from the first
  value. Naive times are read as UTC. Without a
  time column the stream keeps file order and event_time is the row number (pseudo-time, 1 s apart).
- Windows: rows sorted by time (stable, ties keep file order) and cut into `windows` equal-count
  windows; window_starts are the times of each window's first row (several windows may start at
  the same second when many rows share a timestamp).
- Ids: categorical values are compared as strings (a Parquet int 5 is "5"), and ids come from the
  sorted vocabulary of the kept rows of the whole file. A column with no values gets cardinality 1.
  Multi-valued cells are split on their separator; empty tokens are skipped. A Parquet list column
  is multi-valued as it stands (no separator needed).
- Tenants: str(value) of the tenant column, ordered by row count (most first). With max_tenants,
  the max_tenants - 1 most frequent values are kept and the rest folded into "other" (a real value
  "other" merges with them). Without a tenant column there is one tenant, "all".
- example_id: the `id` column (integers within int64) or else the row number in the file.
- Names: a feature whose column is named like a reserved column (example_id, event_time, window,
  tenant, label_click) is renamed with an "f_" prefix; the spec and student feature lists use the
  new name. Columns the mapping does not name are ignored; `drop` records deliberate omissions and
  guards against using a column anyway. Columns in `drop` need not exist in the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from exfm_ray.configbase import Config
from exfm_ray.data.stream import LoadReport, Stream, build_stream, windows_by_count
from exfm_ray.data.table_files import read_table_file
from exfm_ray.errors import DataError
from exfm_ray.schema import RESERVED, SparseFeature, StreamSpec, TenantSpec, arrow_schema, label_column

TASK = "click"
RESERVED_NAMES = (*RESERVED, label_column(TASK))
OTHER_TENANT = "other"
SINGLE_TENANT = "all"


class MappingConfig(Config):
    label: str = Field(description="Binary 0/1 label column; becomes label_click.")
    time: str | None = Field(
        None, description="Event time column (unix seconds or datetime strings); absent = file order."
    )
    time_format: str | None = Field(None, description="strptime format for string times, e.g. '%y%m%d%H'.")
    tenant: str | None = Field(None, description="Column whose values define tenants; absent = one tenant 'all'.")
    max_tenants: int | None = Field(
        None, ge=2, description="At most this many tenants: the most frequent values, the rest folded into 'other'."
    )
    categorical: list[str] = Field(min_length=1, description="Categorical columns, mapped to ids by sorted vocabulary.")
    multi_valued: dict[str, str] = Field(
        default_factory=dict, description="Categorical columns holding several ids, with their separator."
    )
    dense: list[str] = Field(default_factory=list, description="Numeric columns, read as float32 (missing = 0.0).")
    drop: list[str] = Field(default_factory=list, description="Columns deliberately ignored (e.g. leaky ones).")
    windows: int = Field(8, ge=1, description="Number of equal-count time windows.")
    id: str | None = Field(None, description="Integer column used as example_id; absent = row number in the file.")
    student_features: list[str] | None = Field(
        None, min_length=1, description="Categorical columns the students see; default all of them."
    )

    @model_validator(mode="after")
    def _check(self) -> MappingConfig:
        for name, values in (("categorical", self.categorical), ("dense", self.dense)):
            dup = sorted({c for c in values if values.count(c) > 1})
            if dup:
                raise ValueError(f"{name} lists {dup} more than once")
        roles = {
            "label": [self.label],
            "time": [self.time] if self.time else [],
            "tenant": [self.tenant] if self.tenant else [],
            "id": [self.id] if self.id else [],
            "categorical": self.categorical,
            "dense": self.dense,
        }
        for role, cols in roles.items():
            both = sorted(set(cols) & set(self.drop))
            if both:
                raise ValueError(f"column {both[0]!r} is listed in both drop and {role}")
        for role in ("categorical", "dense", "time", "tenant", "id"):
            if self.label in roles[role]:
                raise ValueError(f"label column {self.label!r} cannot also be {role}")
        both = sorted(set(self.categorical) & set(self.dense))
        if both:
            raise ValueError(f"column {both[0]!r} is listed in both categorical and dense")
        if self.id and self.id in set(self.categorical) | set(self.dense):
            raise ValueError(f"id column {self.id!r} cannot also be a feature")
        if self.time_format and not self.time:
            raise ValueError("time_format is set but time is not")
        if self.max_tenants is not None and not self.tenant:
            raise ValueError("max_tenants is set but tenant is not")
        for key, sep in self.multi_valued.items():
            if key not in self.categorical:
                raise ValueError(f"multi_valued column {key!r} is not in categorical")
            if not sep:
                raise ValueError(f"multi_valued column {key!r} has an empty separator")
        unknown = sorted(set(self.student_features or []) - set(self.categorical))
        if unknown:
            raise ValueError(f"student_features {unknown} are not in categorical")
        names = [self.feature_name(c) for c in [*self.categorical, *self.dense]]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"feature name {clash[0]!r} is used twice after renaming reserved column names")
        return self

    @staticmethod
    def feature_name(column: str) -> str:
        """Feature name of a column: reserved stream columns get an 'f_' prefix."""
        return f"f_{column}" if column in RESERVED_NAMES else column

    def named_columns(self) -> list[str]:
        """Every column the mapping needs from the file (drop excluded)."""
        optional = [c for c in (self.time, self.tenant, self.id) if c]
        return [self.label, *optional, *self.categorical, *self.dense]


def load_byo(data_path: Path, mapping: MappingConfig | Path) -> Stream:
    """Load a user's file into a stream according to the mapping (a MappingConfig or a YAML path)."""
    data_path = Path(data_path)
    cfg = mapping if isinstance(mapping, MappingConfig) else MappingConfig.from_yaml(mapping)
    table = read_table_file(data_path)
    missing = [c for c in cfg.named_columns() if c not in table.column_names]
    if missing:
        raise DataError(f"not in {data_path.name}; available columns: {table.column_names}", column=missing[0])
    cols = {c: _clean(table.column(c)) for c in dict.fromkeys(cfg.named_columns())}
    n = table.num_rows

    label, label_ok = _label(cols[cfg.label], cfg.label)
    if cfg.time:
        event_time, time_ok = _times(cols[cfg.time], cfg.time, cfg.time_format)
    else:
        event_time, time_ok = np.arange(n, dtype=np.int64), np.ones(n, bool)
    tenant_raw = _strings(cols[cfg.tenant]) if cfg.tenant else None
    tenant_ok = tenant_raw.is_valid().to_numpy(zero_copy_only=False) if tenant_raw is not None else np.ones(n, bool)
    example_id = _ids(cols[cfg.id], cfg.id) if cfg.id else np.arange(n, dtype=np.int64)

    excluded: dict[str, int] = {}
    keep = np.ones(n, bool)
    for reason, ok in (("label missing", label_ok), ("time missing", time_ok), ("tenant missing", tenant_ok)):
        hit = keep & ~ok
        if hit.any():
            excluded[reason] = int(hit.sum())
        keep &= ok
    report = LoadReport(rows_read=n, excluded=excluded)
    kept = int(keep.sum())
    if kept < cfg.windows:
        raise DataError(
            f"mapping 'windows: {cfg.windows}' leaves a window empty: {kept} rows kept ({report.summary()})"
        )
    rows = np.flatnonzero(keep)
    order, window = windows_by_count(event_time[rows], cfg.windows)
    rows = rows[order]  # input row of each stream row, in stream order

    data: dict[str, object] = {
        "example_id": example_id[rows],
        "event_time": event_time[rows],
        "window": window,
        "label_click": label[rows],
    }
    if tenant_raw is not None:
        tenants, tenant_names = _tenants(tenant_raw.take(pa.array(rows)), cfg.max_tenants)
    else:
        tenants, tenant_names = np.full(len(rows), SINGLE_TENANT, dtype=object), [SINGLE_TENANT]
    data["tenant"] = tenants

    sparse = []
    for col in cfg.categorical:
        name = cfg.feature_name(col)
        sep = cfg.multi_valued.get(col)
        data[name], card = _categorical(cols[col].take(pa.array(rows)), sep)
        multi = sep is not None or _is_list(cols[col].type)
        sparse.append(SparseFeature(name=name, cardinality=max(card, 1), multi_valued=multi))
    filled = {}
    for col in cfg.dense:
        values, missing_mask = _dense(cols[col], col)
        data[cfg.feature_name(col)] = values[rows]
        if missing_mask[rows].any():
            filled[col] = int(missing_mask[rows].sum())

    dense_names = [cfg.feature_name(c) for c in cfg.dense]
    students = [cfg.feature_name(c) for c in (cfg.student_features or cfg.categorical)]
    starts = event_time[rows][np.searchsorted(window, np.arange(cfg.windows))]
    spec = StreamSpec(
        name=_stem(data_path),
        description=_describe(cfg, data_path, tenant_names, report, filled),
        sparse=sparse,
        dense=dense_names,
        tasks=[TASK],
        tenants=[TenantSpec(name=t, task=TASK, features=students, dense=dense_names) for t in tenant_names],
        window_starts=[int(s) for s in starts],
    )
    schema = arrow_schema(spec)
    out = pa.table({f.name: data[f.name] for f in schema}, schema=schema)
    return build_stream(out, spec, report)


def _clean(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strip strings and turn blank ones into nulls, so 'missing' means null from here on."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col
    col = pc.utf8_trim_whitespace(col)
    return pc.if_else(pc.equal(col, ""), pa.scalar(None, col.type), col)


def _present(col: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _numbers(col: pa.ChunkedArray, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(float values, present mask). Present cells that do not parse come back as NaN."""
    present = _present(col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values = pd.to_numeric(pd.Series(col.to_numpy(zero_copy_only=False), dtype=object), errors="coerce")
        return values.to_numpy(np.float64), present
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64), present
    raise DataError(f"expected numbers, got {col.type}", column=column)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _label(col: pa.ChunkedArray, column: str) -> tuple[np.ndarray, np.ndarray]:
    values, present = _numbers(col, column)
    bad = present & ~np.isin(values, (0.0, 1.0))
    if bad.any():
        row = _first(bad)
        raise DataError(f"label must be 0 or 1, got {col[row].as_py()!r}", column=column, row=row)
    return np.where(present, values, 0.0).astype(np.float32), present


def _times(col: pa.ChunkedArray, column: str, fmt: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(unix seconds, present mask); raises DataError at the first present time that does not parse."""
    present = _present(col)
    if fmt is None and (pa.types.is_timestamp(col.type) or pa.types.is_date(col.type)):
        tz = getattr(col.type, "tz", None)
        # Sub-second parts are dropped (floor to the second), hence the unsafe cast.
        seconds = pc.cast(col, pa.timestamp("s", tz=tz), safe=False).cast(pa.int64()).fill_null(0).to_numpy()
        return np.asarray(seconds, dtype=np.int64), present
    if fmt is None and not pa.types.is_boolean(col.type):
        values, _ = _numbers(col, column)
        # Like pandas' format inference, the first time decides: a number means unix seconds throughout.
        if present.any() and np.isfinite(values[_first(present)]):
            bad = present & ~np.isfinite(values)
            if bad.any():
                row = _first(bad)
                raise DataError(
                    f"cannot parse time {col[row].as_py()!r} as unix seconds (the first time is a number)",
                    column=column,
                    row=row,
                )
            return np.where(present, np.floor(np.nan_to_num(values)), 0).astype(np.int64), present
    text = pd.Series(_strings(col).to_numpy(zero_copy_only=False), dtype=object)
    try:
        parsed = pd.to_datetime(text, format=fmt, errors="coerce", utc=True)
    except (ValueError, TypeError) as exc:
        raise DataError(f"cannot parse times ({exc}); set time_format", column=column) from None
    seconds = ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.float64)
    bad = present & np.isnan(seconds)
    if bad.any():
        row = _first(bad)
        how = f"with format {fmt!r}" if fmt else "as a datetime (set time_format if the format varies)"
        raise DataError(f"cannot parse time {col[row].as_py()!r} {how}", column=column, row=row)
    return np.where(present, np.nan_to_num(seconds), 0).astype(np.int64), present


def _ids(col: pa.ChunkedArray, column: str) -> np.ndarray:
    if col.null_count:
        raise DataError("example id missing", column=column, row=_first(~_present(col)))
    try:
        return np.asarray(col.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # The cast failed somewhere; find the first bad row to name it.
    for row, value in enumerate(col.to_pylist()):
        try:
            as_int = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            as_int = None
        if as_int is None or not -(2**63) <= as_int < 2**63:
            raise DataError(f"example id must be an integer within int64, got {value!r}", column=column, row=row)
    raise DataError(f"cannot read {col.type} as int64 example ids", column=column)


def _strings(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return col if pa.types.is_string(col.type) else pc.cast(col, pa.string())


def _tenants(values: pa.ChunkedArray, max_tenants: int | None) -> tuple[np.ndarray, list[str]]:
    names = np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)
    uniq, counts = np.unique(names.astype(str), return_counts=True)
    ranked = [str(u) for u, _ in sorted(zip(uniq, counts, strict=True), key=lambda uc: (-uc[1], uc[0]))]
    if max_tenants is None or len(ranked) <= max_tenants:
        return names, ranked
    keep = ranked[: max_tenants - 1]
    folded = np.where(np.isin(names.astype(str), keep), names, OTHER_TENANT)
    return folded, [t for t in keep if t != OTHER_TENANT] + [OTHER_TENANT]


def _categorical(col: pa.ChunkedArray, sep: str | None) -> tuple[pa.ListArray, int]:
    """List<int64> ids over the sorted vocabulary of the values; missing cells give empty lists."""
    n = len(col)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if _is_list(col.type):
        lists = col
    elif sep is not None:
        lists = pc.split_pattern(_strings(col), pattern=sep)
    else:
        lists = None
    if lists is None:
        present = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        tokens = _strings(col).filter(pa.array(present))
        lengths = present.astype(np.int64)
    else:
        flat = _clean(pc.cast(pc.list_flatten(lists), pa.string()))
        parent = pc.list_parent_indices(lists).to_numpy()
        ok = np.asarray(flat.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        tokens = flat.filter(pa.array(ok))
        lengths = np.bincount(parent[ok], minlength=n).astype(np.int64)
    codes, vocab = pd.factorize(np.asarray(tokens.to_numpy(zero_copy_only=False), dtype=object), sort=True)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(codes.astype(np.int64))), len(vocab)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _dense(col: pa.ChunkedArray, column: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 values with missing (null or NaN) set to 0.0, and the mask of missing cells."""
    values, present = _numbers(col, column)
    is_text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
    unparsed = present & np.isnan(values) if is_text else np.zeros(len(values), bool)
    bad = unparsed | np.isinf(values)
    if bad.any():
        row = _first(bad)
        raise DataError(f"dense value is not a finite number: {col[row].as_py()!r}", column=column, row=row)
    missing = ~present | np.isnan(values)
    return np.where(missing, 0.0, values).astype(np.float32), missing


def _stem(path: Path) -> str:
    name = path.name
    for suffix in reversed(path.suffixes):
        name = name.removesuffix(suffix)
    return name or path.name


def _describe(cfg: MappingConfig, path: Path, tenants: list[str], report: LoadReport, filled: dict[str, int]) -> str:
    if cfg.tenant:
        fold = f", at most {cfg.max_tenants} (the rest folded into '{OTHER_TENANT}')" if cfg.max_tenants else ""
        who = f"tenants = values of column '{cfg.tenant}'{fold}: {tenants}"
    else:
        who = f"one tenant '{SINGLE_TENANT}'"
    if cfg.time:
        when = f"sorted by column '{cfg.time}'" + (f" (format {cfg.time_format!r})" if cfg.time_format else "")
    else:
        when = "file order, event_time = row number (pseudo-time)"
    parts = [
        f"bring-your-own data from {path.name}, label column '{cfg.label}'",
        who,
        f"{cfg.windows} equal-count windows, {when}",
        report.summary(),
    ]
    if filled:
        parts.append("dense missing values set to 0.0: " + ", ".join(f"{c} {k}" for c, k in filled.items()))
    return "; ".join(parts)
