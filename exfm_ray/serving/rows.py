"""Validated request rows -> the tensors a ServingStudent takes. Pure functions, no Ray.

`encode_rows` checks one request against the tenant's inputs (which features, id ranges, dense
names, request size) and keeps its ids per feature; `to_batch` joins several encoded requests
into one KeyedJaggedTensor, so requests batched together share one forward pass but are validated
alone: a bad request is refused before it reaches a batch.
Shape letters: B rows, Dn dense inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchrec import KeyedJaggedTensor

from exfm_ray.errors import DataError
from exfm_ray.serving.schema import PredictRow
from exfm_ray.students.meta import StudentMeta

MAX_REPORTED_ISSUES = 10


@dataclass(frozen=True)
class RowSpec:
    """What a row must carry for one student: sparse features in model order, dense names."""

    features: tuple[str, ...]
    cardinality: dict[str, int]
    multi_valued: frozenset[str]
    dense: tuple[str, ...]

    @classmethod
    def from_meta(cls, meta: StudentMeta) -> RowSpec:
        return cls(
            features=tuple(f.name for f in meta.features),
            cardinality={f.name: f.cardinality for f in meta.features},
            multi_valued=frozenset(f.name for f in meta.features if f.multi_valued),
            dense=tuple(meta.dense),
        )


@dataclass(frozen=True)
class RowIssue:
    """One problem: `loc` as FastAPI reports it, e.g. ('body', 'rows', 3, 'sparse', 'user_id')."""

    loc: tuple[str | int, ...]
    msg: str

    def where(self) -> str:
        parts = [str(p) for p in self.loc[1:]]
        text = ""
        for p in parts:
            text += f"[{p}]" if p.isdigit() else (f".{p}" if text else p)
        return text


class RowError(DataError):
    """A request that does not fit the tenant's student; names the field and row of each problem."""

    def __init__(self, issues: list[RowIssue]):
        assert issues
        super().__init__("; ".join(f"{i.where()}: {i.msg}" for i in issues))
        self.issues = issues

    def detail(self) -> list[dict]:
        """FastAPI's 422 `detail` format, so pydantic and model checks read alike."""
        return [{"loc": list(i.loc), "msg": i.msg, "type": "value_error"} for i in self.issues]


@dataclass(frozen=True)
class EncodedRows:
    """One request's rows: per feature, the ids of all rows (row-major) and the count per row."""

    num_rows: int
    ids: dict[str, list[int]]
    lengths: dict[str, list[int]]
    dense: list[list[float]]


def encode_rows(rows: Sequence[PredictRow], spec: RowSpec, max_rows: int) -> EncodedRows:
    """Check rows against the student's inputs; raise RowError naming field and row, else encode them."""
    if len(rows) > max_rows:
        raise RowError([RowIssue(("body", "rows"), f"{len(rows)} rows; at most {max_rows} per request")])
    issues: list[RowIssue] = []
    ids: dict[str, list[int]] = {f: [] for f in spec.features}
    lengths: dict[str, list[int]] = {f: [] for f in spec.features}
    dense: list[list[float]] = []
    for r, row in enumerate(rows):
        sparse = row.sparse
        for f in spec.features:
            values = sparse.get(f)
            if values is None:
                issues.append(RowIssue(("body", "rows", r, "sparse", f), "missing feature"))
                continue
            card = spec.cardinality[f]
            for v in values:
                if v < 0 or v >= card:
                    issues.append(RowIssue(("body", "rows", r, "sparse", f), f"id {v} outside [0, {card})"))
                    break
            if len(values) > 1 and f not in spec.multi_valued:
                issues.append(RowIssue(("body", "rows", r, "sparse", f), "several ids for a single-valued feature"))
            ids[f].extend(values)
            lengths[f].append(len(values))
        for f in sparse:
            if f not in spec.cardinality:
                msg = f"unknown feature; this tenant takes {list(spec.features)}"
                issues.append(RowIssue(("body", "rows", r, "sparse", f), msg))
        given = row.dense
        for d in spec.dense:
            if d not in given:
                issues.append(RowIssue(("body", "rows", r, "dense", d), "missing dense value"))
        for d in given:
            if d not in spec.dense:
                msg = f"unknown dense input; expected {list(spec.dense)}"
                issues.append(RowIssue(("body", "rows", r, "dense", d), msg))
        if not issues:
            dense.append([given[d] for d in spec.dense])
        if len(issues) >= MAX_REPORTED_ISSUES:
            break
    if issues:
        raise RowError(issues[:MAX_REPORTED_ISSUES])
    return EncodedRows(len(rows), ids, lengths, dense)


def to_batch(parts: Sequence[EncodedRows], spec: RowSpec) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Join encoded requests into the student's inputs: KJT over spec.features (B rows) and dense [B, Dn]."""
    values: list[int] = []
    lengths: list[int] = []
    for f in spec.features:
        for p in parts:
            values.extend(p.ids[f])
            lengths.extend(p.lengths[f])
    sparse = KeyedJaggedTensor(
        keys=list(spec.features),
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )
    num_rows = sum(p.num_rows for p in parts)
    rows = [row for p in parts for row in p.dense]
    dense = torch.tensor(rows, dtype=torch.float32) if spec.dense else torch.zeros(num_rows, 0)
    return sparse, dense
