"""Arrow rows -> tensors: KeyedJaggedTensor for sparse ids, dense matrix, labels, FM columns.

A window is converted once (`WindowTensors`) and then sliced into batches, so the several
variants and seeds of an experiment do not redo the Arrow work.
Shape letters: B batch, N rows, F features, Dn dense features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec import KeyedJaggedTensor

from exfm_ray.errors import DataError
from exfm_ray.schema import FM_LOGIT, FM_MASK, StreamSpec, label_column


@dataclass
class Batch:
    """One mini-batch.

    Args:
        sparse: KJT with the requested features, B rows each.
        dense: [B, Dn] float32.
        label: [B] float32, the label of each row's tenant task.
        tenant: [B] int64 index into the spec's tenant list.
        fm_logit: [B] float32 FM logit for the row's tenant head (0 where masked).
        fm_mask: [B] bool, True where the FM label may be used.
        history: LoopFM input or None: ([B, keys, K, Dfm] the entities' past FM embeddings, oldest
            first, zero-padded in front; [B, keys] how many of the K are real).
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    label: torch.Tensor
    tenant: torch.Tensor
    fm_logit: torch.Tensor
    fm_mask: torch.Tensor
    history: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return int(self.label.shape[0])


class WindowTensors:
    """Column tensors of a set of rows (a window or one tenant's part of it)."""

    def __init__(self, table: pa.Table, spec: StreamSpec):
        self.spec = spec
        self.num_rows = table.num_rows
        self.values: dict[str, torch.Tensor] = {}
        self.offsets: dict[str, torch.Tensor] = {}
        for f in spec.sparse:
            col = table.column(f.name).combine_chunks()
            offsets = col.offsets.to_numpy().astype(np.int64)
            # A sliced ListArray keeps its parent's offsets; rebase so offsets[0] == 0.
            values = col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
            self.offsets[f.name] = torch.from_numpy(offsets - offsets[0])
            self.values[f.name] = torch.from_numpy(np.array(values, dtype=np.int64))
        dense = [table.column(d).to_numpy(zero_copy_only=False).astype(np.float32) for d in spec.dense]
        self.dense = torch.from_numpy(np.stack(dense, axis=1)) if dense else torch.zeros(self.num_rows, 0)
        # Feature-only tables (e.g. a batch to label) have no tenant, label or id columns.
        names = set(table.column_names)
        n = self.num_rows
        self.tenant = torch.from_numpy(_tenant_index(table, spec) if "tenant" in names else np.zeros(n, np.int64))
        has_labels = "tenant" in names and all(label_column(t) in names for t in spec.tasks)
        labels = _row_labels(table, spec, self.tenant.numpy()) if has_labels else np.full(n, np.nan, np.float32)
        self.label = torch.from_numpy(labels)
        ids = table.column("example_id").to_numpy() if "example_id" in names else np.arange(n)
        self.example_id = torch.from_numpy(np.array(ids, dtype=np.int64))
        if FM_LOGIT in table.column_names:
            self.fm_logit = torch.from_numpy(pc.fill_null(table.column(FM_LOGIT), 0.0).to_numpy().astype(np.float32))
            self.fm_mask = torch.from_numpy(
                pc.fill_null(table.column(FM_MASK), False).to_numpy(zero_copy_only=False).astype(bool)
            )
        else:
            self.fm_logit = torch.zeros(self.num_rows)
            self.fm_mask = torch.zeros(self.num_rows, dtype=torch.bool)
        self.history = None  # LoopFM RowHistories (exfm_ray/loopfm/features.py) or None

    def set_fm(self, fm_logit: torch.Tensor, fm_mask: torch.Tensor) -> None:
        assert fm_logit.shape == (self.num_rows,) and fm_mask.shape == (self.num_rows,)
        self.fm_logit = fm_logit.float()
        self.fm_mask = fm_mask.bool()

    def set_history(self, histories) -> None:
        """LoopFM histories of these rows (a RowHistories: per key the distinct entities', and each
        row's entity); a batch gathers its rows', see Batch.history."""
        assert histories.num_rows == self.num_rows
        self.history = histories

    def first_ids(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Each row's first id of feature `name` (its entity) and whether it has one."""
        off = self.offsets[name].numpy()
        present = off[1:] > off[:-1]
        ids = np.zeros(self.num_rows, np.int64)
        ids[present] = self.values[name].numpy()[off[:-1][present]]
        return ids, present

    def batch(self, lo: int, hi: int, features: list[str], dense: list[str] | None = None) -> Batch:
        """Rows [lo, hi) with the given sparse features and dense columns (default: all dense)."""
        lengths, values = [], []
        for name in features:
            off = self.offsets[name]
            lengths.append(off[lo + 1 : hi + 1] - off[lo:hi])
            values.append(self.values[name][off[lo] : off[hi]])
        kjt = KeyedJaggedTensor(keys=list(features), values=torch.cat(values), lengths=torch.cat(lengths))
        return Batch(
            kjt,
            self.dense[lo:hi] if dense is None else self.dense[lo:hi, self._dense_index(dense)],
            self.label[lo:hi],
            self.tenant[lo:hi],
            self.fm_logit[lo:hi],
            self.fm_mask[lo:hi],
            None if self.history is None else self.history.rows(lo, hi),
        )

    def batches(self, batch_size: int, features: list[str], dense: list[str] | None = None) -> list[Batch]:
        return [
            self.batch(lo, min(lo + batch_size, self.num_rows), features, dense)
            for lo in range(0, self.num_rows, batch_size)
        ]

    def _dense_index(self, names: list[str]) -> list[int]:
        return [self.spec.dense.index(n) for n in names]


def _tenant_index(table: pa.Table, spec: StreamSpec) -> np.ndarray:
    names = spec.tenant_names
    idx = pc.index_in(table.column("tenant"), value_set=pa.array(names))
    if idx.null_count:
        row = int(np.flatnonzero(idx.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"unknown tenant {table.column('tenant')[row].as_py()!r}", column="tenant", row=row)
    return idx.to_numpy().astype(np.int64)


def _row_labels(table: pa.Table, spec: StreamSpec, tenant: np.ndarray) -> np.ndarray:
    """The label of each row is its tenant's task label (NaN where not yet known)."""
    label = np.full(table.num_rows, np.nan, dtype=np.float32)
    for i, t in enumerate(spec.tenants):
        col = pc.fill_null(table.column(label_column(t.task)), np.nan).to_numpy().astype(np.float32)
        label = np.where(tenant == i, col, label)
    return label
