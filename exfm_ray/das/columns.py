"""The augmented row: every stream column plus the FM's outputs. Pure functions on one batch.

Columns added by the DAS (plain Arrow types):

| column                 | type                        | meaning                                           |
|------------------------|-----------------------------|---------------------------------------------------|
| fm_logit_<head>        | float32, null if no label   | FM logit of each head (one head per tenant task)  |
| fm_prob_<head>         | float32, null if no label   | sigmoid of it                                     |
| fm_logit               | float32, null if no label   | the row's own tenant head (what its student uses) |
| fm_mask                | bool                        | FM label present and passing the leakage guard    |
| fm_emb                 | fixed_size_list<float32>[D] | FM embedding (its last hidden layer), for LoopFM  |
| fm_version             | string, null if none        | the FM version that labeled the row               |
| fm_data_watermark      | int64, null if none         | last event time that version trained on           |
| das_infer_ts           | int64                       | unix seconds when the row was labeled             |
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from exfm_ray.fm.labels import FMLabels
from exfm_ray.schema import FM_LOGIT, FM_MASK, StreamSpec

FM_EMB = "fm_emb"
FM_VERSION = "fm_version"
FM_WATERMARK = "fm_data_watermark"
DAS_TS = "das_infer_ts"


def head_columns(heads: list[str]) -> list[str]:
    return [f"fm_logit_{h}" for h in heads] + [f"fm_prob_{h}" for h in heads]


def label_columns(heads: list[str]) -> list[str]:
    """The columns of a label_table (one row per example), in order."""
    return ["example_id", *head_columns(heads), FM_EMB, FM_VERSION, FM_WATERMARK, DAS_TS]


def label_table(example_ids: pa.Array, labels: FMLabels | None, heads: list[str], emb_dim: int, now: int) -> pa.Table:
    """One row per example: its FM outputs, or nulls (labels None: the FM could not answer)."""
    n = len(example_ids)
    cols: dict[str, pa.Array] = {"example_id": pa.array(example_ids, pa.int64())}
    if labels is None:
        for name in head_columns(heads):
            cols[name] = pa.nulls(n, pa.float32())
        cols[FM_EMB] = pa.nulls(n, pa.list_(pa.float32(), emb_dim))
        cols[FM_VERSION] = pa.nulls(n, pa.string())
        cols[FM_WATERMARK] = pa.nulls(n, pa.int64())
    else:
        assert labels.heads == heads and labels.num_rows == n
        probs = labels.probs.astype(np.float32)
        for i, h in enumerate(heads):
            cols[f"fm_logit_{h}"] = pa.array(labels.logits[:, i].astype(np.float32))
        for i, h in enumerate(heads):
            cols[f"fm_prob_{h}"] = pa.array(probs[:, i])
        flat = pa.array(labels.hidden.astype(np.float32).reshape(-1))
        cols[FM_EMB] = pa.FixedSizeListArray.from_arrays(flat, emb_dim)
        cols[FM_VERSION] = pa.array([labels.version] * n, pa.string())
        cols[FM_WATERMARK] = pa.array(np.full(n, labels.watermark, np.int64))
    cols[DAS_TS] = pa.array(np.full(n, now, np.int64))
    return pa.table(cols)


def attach(rows: pa.Table, labels: pa.Table, spec: StreamSpec) -> pa.Table:
    """Join FM outputs onto tenant rows by example_id and derive each row's own fm_logit/fm_mask.

    Every row of `rows` comes out once, in order; a row whose example has no FM output gets
    nulls and fm_mask False. The mask is also False where the version's watermark is not strictly
    before the row's event time (leakage guard, per row).
    """
    pos = pc.index_in(rows.column("example_id"), value_set=labels.column("example_id"))
    found = pc.is_valid(pos)
    everywhere = pos.null_count == 0  # the usual case: skip masking (a copy of every column, fm_emb included)
    take = pos if everywhere else pc.fill_null(pos, 0)
    out = rows
    for name in labels.column_names:
        if name == "example_id":
            continue
        col = (
            labels.column(name).take(take)
            if labels.num_rows
            else pa.nulls(rows.num_rows, labels.schema.field(name).type)
        )
        if not everywhere:
            col = pc.if_else(found, col, pa.scalar(None, col.type))
        out = out.append_column(name, col)
    own = _own_head_logit(out, spec)
    watermark = out.column(FM_WATERMARK)
    fresh = pc.less(watermark, out.column("event_time"))
    mask = pc.fill_null(pc.and_(pc.is_valid(own), fresh), False)
    return out.append_column(FM_LOGIT, own).append_column(FM_MASK, mask)


def _own_head_logit(table: pa.Table, spec: StreamSpec) -> pa.ChunkedArray:
    tenant = table.column("tenant")
    out = pa.nulls(table.num_rows, pa.float32())
    for t in spec.tenant_names:
        out = pc.if_else(pc.equal(tenant, t), table.column(f"fm_logit_{t}"), out)
    return out


def first_occurrence(example_id: np.ndarray) -> np.ndarray:
    """Boolean mask of the first row of each example_id (dedup across tenants)."""
    _, first = np.unique(example_id, return_index=True)
    mask = np.zeros(len(example_id), bool)
    mask[first] = True
    return mask
