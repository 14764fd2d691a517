"""The one row schema of the stream, and the spec that describes a stream's features and tenants.

A row is one (tenant, example) event. The same example_id may be logged by several tenants
(overlapping traffic); its features and labels are then identical on each tenant's row.

Columns (plain Arrow types, so any Parquet reader understands them):

| column          | type          | meaning                                                  |
|-----------------|---------------|----------------------------------------------------------|
| example_id      | int64         | request x candidate id; dedup and join key               |
| event_time      | int64         | unix seconds (UTC) when the features were logged         |
| window          | int32         | time window index, 0-based; Parquet partition            |
| tenant          | string        | the tenant (vertical model) that logged the row          |
| label_<task>    | float32       | binary label per task (0/1)                              |
| <sparse name>   | list<int64>   | categorical ids in [0, cardinality); several = multi-hot |
| <dense name>    | float32       | dense feature                                            |
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from exfm_ray.configbase import Config
from exfm_ray.errors import ConfigError, DataError

RESERVED = ("example_id", "event_time", "window", "tenant")
# Columns of an augmented row that students read (the row's own tenant head); see exfm_ray/das/columns.py.
FM_LOGIT = "fm_logit"
FM_MASK = "fm_mask"
SPEC_METADATA_KEY = b"exfm.spec"


def label_column(task: str) -> str:
    return f"label_{task}"


class SparseFeature(Config):
    name: str = Field(description="Column name of the feature (list<int64> of ids).")
    cardinality: int = Field(gt=0, description="Ids lie in [0, cardinality); sizes the embedding table.")
    multi_valued: bool = Field(False, description="Rows may carry several ids (pooled by mean).")


class TenantSpec(Config):
    name: str = Field(description="Tenant id: one vertical model (product surface x task).")
    task: str = Field("click", description="Task whose label column (label_<task>) the tenant learns.")
    features: list[str] = Field(description="Sparse features this tenant logs; its student sees these.")
    dense: list[str] = Field(default_factory=list, description="Dense features this tenant logs.")


class StreamSpec(Config):
    name: str = Field(description="Name of the stream (dataset).")
    description: str = Field("", description="How tenants and windows were formed.")
    sparse: list[SparseFeature] = Field(description="Categorical features, in model input order.")
    dense: list[str] = Field(default_factory=list, description="Dense float features.")
    tasks: list[str] = Field(default_factory=lambda: ["click"], description="Label tasks.")
    tenants: list[TenantSpec] = Field(min_length=1, description="Tenants in the stream.")
    window_starts: list[int] = Field(
        description="Start of each window (unix seconds, inclusive); window t ends where t+1 starts."
    )

    @model_validator(mode="after")
    def _check(self) -> StreamSpec:
        names = [f.name for f in self.sparse] + list(self.dense)
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"feature names repeated: {sorted(dup)}")
        clash = set(names) & (set(RESERVED) | {label_column(t) for t in self.tasks})
        if clash:
            raise ValueError(f"feature names clash with reserved columns: {sorted(clash)}")
        for tenant in self.tenants:
            unknown = set(tenant.features) - {f.name for f in self.sparse}
            unknown |= set(tenant.dense) - set(self.dense)
            if unknown:
                raise ValueError(f"tenant {tenant.name!r} names unknown features {sorted(unknown)}")
            if tenant.task not in self.tasks:
                raise ValueError(f"tenant {tenant.name!r} has unknown task {tenant.task!r}")
        if list(self.window_starts) != sorted(self.window_starts):
            raise ValueError("window_starts must be increasing")
        return self

    @property
    def num_windows(self) -> int:
        return len(self.window_starts)

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def tenant_names(self) -> list[str]:
        return [t.name for t in self.tenants]

    def tenant(self, name: str) -> TenantSpec:
        for t in self.tenants:
            if t.name == name:
                return t
        raise ConfigError(f"unknown tenant {name!r}; the stream has {self.tenant_names}")

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse:
            if f.name == name:
                return f
        raise ConfigError(f"unknown sparse feature {name!r}")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> StreamSpec:
        return cls.parse(json.loads(text), source="stream spec")


def arrow_schema(spec: StreamSpec) -> pa.Schema:
    fields = [
        pa.field("example_id", pa.int64(), nullable=False),
        pa.field("event_time", pa.int64(), nullable=False),
        pa.field("window", pa.int32(), nullable=False),
        pa.field("tenant", pa.string(), nullable=False),
    ]
    fields += [pa.field(label_column(t), pa.float32()) for t in spec.tasks]
    fields += [pa.field(f.name, pa.list_(pa.int64())) for f in spec.sparse]
    fields += [pa.field(d, pa.float32()) for d in spec.dense]
    return pa.schema(fields, metadata={SPEC_METADATA_KEY: spec.to_json().encode()})


def validate_table(table: pa.Table, spec: StreamSpec, *, labels_required: bool = True) -> pa.Table:
    """Check a table against the stream schema and return it cast to the exact schema.

    Raises DataError naming the first bad column (and row, where a value is at fault).
    """
    schema = arrow_schema(spec)
    for field in schema:
        if field.name not in table.column_names:
            raise DataError("missing column", column=field.name)
    out = []
    for field in schema:
        col = table.column(field.name)
        try:
            col = col.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"expected {field.type}, got {col.type} ({exc})", column=field.name) from None
        out.append(col)
    table = pa.Table.from_arrays(out, schema=schema)
    for name in ("example_id", "event_time", "window", "tenant"):
        _no_nulls(table, name)
    _check_labels(table, spec, labels_required)
    for f in spec.sparse:
        _check_ids(table, f)
    unknown = set(pc.unique(table.column("tenant")).to_pylist()) - set(spec.tenant_names)
    if unknown:
        first = _first_row(pc.is_in(table.column("tenant"), pa.array(sorted(unknown))))
        raise DataError(f"unknown tenant {sorted(unknown)[0]!r}", column="tenant", row=first)
    return table


def validate_features(table: pa.Table, spec: StreamSpec) -> pa.Table:
    """Check only the model inputs (sparse and dense features) and return just those columns, cast.

    What the FM needs to label a batch; raises DataError naming the column (and row).
    """
    fields = [f for f in arrow_schema(spec) if f.name in set(spec.sparse_names) | set(spec.dense)]
    cols = []
    for field in fields:
        if field.name not in table.column_names:
            raise DataError("missing column", column=field.name)
        col = table.column(field.name)
        try:
            cols.append(col.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"expected {field.type}, got {col.type} ({exc})", column=field.name) from None
    out = pa.Table.from_arrays(cols, schema=pa.schema(fields))
    for f in spec.sparse:
        _check_ids(out, f)
    for name in spec.dense:
        col = out.column(name)
        if col.null_count:
            raise DataError("null dense value", column=name, row=_first_row(col.is_null()))
        values = col.to_numpy(zero_copy_only=False)
        if not np.isfinite(values).all():
            raise DataError(
                "dense value is NaN or infinite", column=name, row=int(np.flatnonzero(~np.isfinite(values))[0])
            )
    return out


def _first_row(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _no_nulls(table: pa.Table, name: str) -> None:
    col = table.column(name)
    if col.null_count:
        raise DataError("null value", column=name, row=_first_row(col.is_null()))


def _check_labels(table: pa.Table, spec: StreamSpec, required: bool) -> None:
    for task in spec.tasks:
        name = label_column(task)
        col = table.column(name)
        if required and col.null_count:
            raise DataError("label missing", column=name, row=_first_row(col.is_null()))
        bad = pc.and_(pc.is_valid(col), pc.and_(pc.not_equal(col, 0.0), pc.not_equal(col, 1.0)))
        if pc.any(bad).as_py():
            row = _first_row(pc.fill_null(bad, False))
            raise DataError(f"label must be 0 or 1, got {col[row].as_py()}", column=name, row=row)


def _check_ids(table: pa.Table, feature: SparseFeature) -> None:
    col = table.column(feature.name).combine_chunks()
    if col.null_count:
        raise DataError("null list (use an empty list for no ids)", column=feature.name, row=_first_row(col.is_null()))
    values = col.flatten()
    if len(values) == 0:
        return
    vals = values.to_numpy()
    bad = (vals < 0) | (vals >= feature.cardinality)
    if bad.any():
        flat_index = int(np.flatnonzero(bad)[0])
        offsets = col.offsets.to_numpy()
        row = int(np.searchsorted(offsets, flat_index, side="right") - 1)
        raise DataError(f"id {int(vals[flat_index])} outside [0, {feature.cardinality})", column=feature.name, row=row)
    if not feature.multi_valued:
        lengths = pc.list_value_length(col).to_numpy()
        if (lengths > 1).any():
            row = int(np.flatnonzero(lengths > 1)[0])
            raise DataError("several ids in a single-valued feature", column=feature.name, row=row)
