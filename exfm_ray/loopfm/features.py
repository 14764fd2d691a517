"""LoopFM features: a student's view of the FM's past embeddings of the row's entities.

The store hands each row, per key, the entity's last K FM embeddings (oldest first, zero-padded)
and how many of them are real. The tower pools them (mean, last, sum, or attention over the K with
a learned query), projects each key's vector to the student's embedding size, and puts a learned
"no history" vector where the entity has none. The result joins the student's feature vectors
(one slot per key), so the interaction layer crosses it with the student's own features.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exfm_ray.loopfm.config import Pooling
from exfm_ray.loopfm.store import StoreView


class LoopTower(nn.Module):
    """[B, keys, K, D] histories and [B, keys] counts -> [B, keys, d] feature vectors."""

    def __init__(self, keys: int, fm_dim: int, dim: int, pooling: Pooling):
        super().__init__()
        self.pooling = pooling
        self.proj = nn.ModuleList(nn.Linear(fm_dim, dim) for _ in range(keys))
        # Zero start: the new slot reads 0 for every row, so a LoopFM student starts where the
        # student without it does and the histories enter as they earn their gradient (a random
        # projection put noise into every row's interactions: MovieLens, worst window +6% NE).
        for proj in self.proj:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.missing = nn.Parameter(torch.zeros(keys, dim))
        self.query = nn.Parameter(torch.zeros(keys, fm_dim)) if pooling == "attention" else None

    def forward(self, hist: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.key_vectors(i, hist[:, i], kept[:, i]) for i in range(len(self.proj))], dim=1)

    def key_vectors(self, i: int, hist: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Key i's vectors: [E, K, Dfm] histories, [E] counts -> [E, d]. A function of the entity
        alone, so Serve computes it once per entity and store version, not per request."""
        k = hist.shape[1]
        # real events sit at the end of the K slots (oldest first, padding in front)
        real = torch.arange(k, device=hist.device).view(1, k) >= (k - kept).unsqueeze(1)  # [E, K]
        query = self.query[i : i + 1] if self.query is not None else None
        pooled = pool(hist.unsqueeze(1), real.unsqueeze(1), self.pooling, query)[:, 0]
        vectors = self.proj[i](pooled)
        return torch.where((kept > 0).unsqueeze(1), vectors, self.missing[i].expand_as(vectors))


def pool(hist: torch.Tensor, real: torch.Tensor, pooling: Pooling, query: torch.Tensor | None) -> torch.Tensor:
    w = real.to(hist.dtype)
    if pooling == "last":
        return hist[:, :, -1]
    if pooling == "sum":
        return (hist * w.unsqueeze(3)).sum(2)
    if pooling == "mean":
        return (hist * w.unsqueeze(3)).sum(2) / w.sum(2, keepdim=True).clamp(min=1)
    scores = torch.einsum("bnkd,nd->bnk", hist, query).masked_fill(~real, -1e9)
    att = torch.softmax(scores, dim=2) * w  # no history: all weights 0 (the missing vector replaces it)
    return (hist * att.unsqueeze(3)).sum(2)


class RowHistories:
    """A window's LoopFM input, compact: per key the distinct entities' histories ([U, K, D]) and
    counts ([U]), and each row's entity ([N, keys]). A batch gathers its rows' histories, so a
    window never holds N x K x D floats (a million rows at K = 8, D = 96: 3 GB per key)."""

    def __init__(self, hist: list[torch.Tensor], kept: list[torch.Tensor], index: torch.Tensor):
        self.hist, self.kept, self.index = hist, kept, index

    @property
    def num_rows(self) -> int:
        return int(self.index.shape[0])

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [lo, hi): ([B, keys, K, D] float32, [B, keys] int64)."""
        idx = self.index[lo:hi]
        hist = torch.stack([h[idx[:, i]] for i, h in enumerate(self.hist)], dim=1)
        kept = torch.stack([c[idx[:, i]] for i, c in enumerate(self.kept)], dim=1)
        return hist, kept


def row_histories(
    view: StoreView,
    keys: list[str],
    entities: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int | None = None,
    pooling: Pooling | None = None,
) -> RowHistories:
    """The rows' histories from one store version, each key's entities looked up once.
    `entities[key]`: (first ids, has an id); a row without an id reads as an unseen entity.
    `k`: the reader's K, when smaller than the store's (its last k events).
    `pooling` mean, sum or last (no parameters): pooled here, once per entity, and handed on as a
    history of one event, which the tower pools to itself; the answer is the same, and a training
    batch no longer pools [B, K, D] (attention's learned query must see the K events)."""
    hist, kept, index = [], [], []
    for key in keys:
        ids, present = entities[key]
        distinct, inverse = np.unique(np.where(present, ids, -1), return_inverse=True)  # ids are >= 0
        h, c = (torch.from_numpy(x) for x in last_k(*view.history(key, distinct), k))
        if pooling in ("mean", "sum", "last"):
            real = torch.arange(h.shape[1]).view(1, -1) >= (h.shape[1] - c).unsqueeze(1)
            h, c = pool(h.unsqueeze(1), real.unsqueeze(1), pooling, None), c.clamp(max=1)  # [U, 1, D]
        hist.append(h)
        kept.append(c)
        index.append(inverse.reshape(-1))
    return RowHistories(hist, kept, torch.from_numpy(np.stack(index, 1)) if index else torch.zeros(0, 0))


def last_k(hist: np.ndarray, kept: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A [N, K, D] history cut to its last k slots (the newest events; padding stays in front)."""
    if k is None or k >= hist.shape[1]:
        return hist, kept
    return np.ascontiguousarray(hist[:, -k:]), np.minimum(kept, k)


def history_columns(
    view: StoreView, keys: list[str], entities: dict[str, tuple[np.ndarray, np.ndarray]], k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's histories at once: ([N, keys, K, D] float32, [N, keys] counts); see row_histories."""
    rows = row_histories(view, keys, entities, k)
    hist, kept = rows.rows(0, rows.num_rows)
    return hist.numpy(), kept.numpy()
