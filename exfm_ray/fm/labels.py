"""What the FM group returns for a batch, and how a batch is split across ranks and gathered.

Every rank of a sharded FM must run the same collectives with the same local batch size, so a
batch of N rows becomes `parts` chunks of ceil(N / parts) rows, the last ones padded by repeating
a real row; the padded outputs are dropped on the way back, and the order of rows is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class FMLabels:
    """FM output for N rows.

    Args:
        version: the FM version that produced every row of this answer.
        watermark: that version's data watermark (unix s).
        heads: head names = column order of `logits` (one per tenant task).
        logits: [N, H] float32.
        hidden: [N, Dh] float32, the FM embedding (its final hidden representation).
    """

    version: str
    watermark: int
    heads: list[str]
    logits: np.ndarray
    hidden: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.logits.shape[0])

    @property
    def probs(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits))


def split_padded(table: pa.Table, parts: int) -> tuple[list[pa.Table], list[int]]:
    """Equal-size chunks (padded with copies of a real row) and the number of real rows in each."""
    n = table.num_rows
    assert n > 0 and parts > 0
    size = -(-n // parts)
    chunks, real = [], []
    for i in range(parts):
        lo, hi = min(i * size, n), min((i + 1) * size, n)
        chunk = table.slice(lo, hi - lo)
        pad = size - chunk.num_rows
        if pad:
            filler = table.slice(n - 1, 1)
            chunk = pa.concat_tables([chunk, *([filler] * pad)])
        chunks.append(chunk)
        real.append(hi - lo)
    return chunks, real


def gather(outputs: list[np.ndarray], real: list[int]) -> np.ndarray:
    """Concatenate per-rank outputs in rank order, dropping padded rows."""
    return np.concatenate([out[:k] for out, k in zip(outputs, real, strict=True)], axis=0)
