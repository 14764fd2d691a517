"""LoopFM in a Serve replica: the newest committed store version, shared by the replica's tenants.

A request's entities (the first id of each key feature in its rows) are looked up in that version;
an entity the store never saw reads as unseen (the student's "no history" vector), not an error.
The reloader refreshes the version as windows close. The FM is never called, and neither is the
student's history tower at request time: its output per entity is computed when a version loads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from exfm_ray.loopfm.builder import store_root
from exfm_ray.loopfm.features import LoopTower, last_k
from exfm_ray.loopfm.store import StoreReader, StoreView
from exfm_ray.serving.rows import EncodedRows


class NewestStore:
    """The newest version of the LoopFM store under a storage root (None while there is none)."""

    def __init__(self, storage: str | Path):
        self.root = store_root(storage)
        self._reader: StoreReader | None = None
        self._lock = threading.Lock()  # loads and the reloader run in threads

    def view(self) -> StoreView | None:
        """The newest committed version, read from storage only when it moved (the reader keeps it)."""
        with self._lock:
            if self._reader is None:
                self._reader = StoreReader.open(self.root)
                if self._reader is None:
                    return None
            latest = self._reader.latest()
            return None if latest is None else self._reader.version_view(latest)


class EntityVectors:
    """A LoopFM student's tower output for every entity of one store version, per key: a request
    then costs an id -> row lookup, not a pass over K embeddings (the tower's output depends on
    the entity alone). Built in chunks, so a big store never holds its float32 histories at once."""

    CHUNK = 16_384

    def __init__(self, tower: LoopTower, view: StoreView, keys: Sequence[str], k: int):
        self.version, self.keys = view.version, list(keys)
        self.index: list[dict[int, int]] = []  # per key: entity -> its row in the store table
        self.vectors: list[torch.Tensor] = []  # per key: [E + 1, d] in table-row order, the last "no history"
        with torch.inference_mode():
            for i, key in enumerate(self.keys):
                table = view.tables[key]
                parts = []
                for lo in range(0, len(table.n), self.CHUNK):
                    hist = table.emb[lo : lo + self.CHUNK].astype(np.float32)
                    kept = np.minimum(table.n[lo : lo + self.CHUNK], table.k)
                    hist, kept = last_k(hist, kept, k)
                    parts.append(tower.key_vectors(i, torch.from_numpy(hist), torch.from_numpy(kept)))
                parts.append(tower.missing[i].unsqueeze(0))
                self.index.append(table.index)
                self.vectors.append(torch.cat(parts))

    def lookup(self, parts: Sequence[EncodedRows]) -> torch.Tensor:
        """[B, keys, d]: each row's vectors; an unseen entity or a row without the id gets "no history"."""
        out = []
        for index, vectors, key in zip(self.index, self.vectors, self.keys, strict=True):
            ids, present = first_ids(parts, key)
            missing = len(vectors) - 1
            rows = [index.get(int(e), missing) if p else missing for e, p in zip(ids, present, strict=True)]
            out.append(vectors[torch.tensor(rows, dtype=torch.long)])
        return torch.stack(out, dim=1)


def readable(view: StoreView | None, keys: Sequence[str]) -> bool:
    return view is not None and all(k in view.tables for k in keys)


def entity_vectors(tower: LoopTower, view: StoreView | None, keys: Sequence[str], k: int) -> EntityVectors | None:
    """None (every entity unseen) without a store version, or when it lacks one of the keys."""
    return EntityVectors(tower, view, keys, k) if readable(view, keys) else None


def first_ids(parts: Sequence[EncodedRows], feature: str) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first id of `feature` and whether it has one, over the requests in order."""
    ids, present = [], []
    for p in parts:
        values, at = p.ids[feature], 0
        for n in p.lengths[feature]:
            ids.append(values[at] if n else 0)
            present.append(n > 0)
            at += n
    return np.asarray(ids, np.int64), np.asarray(present, bool)
