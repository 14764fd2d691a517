"""LoopFM in a Serve replica: the newest committed store version, shared by the replica's tenants.

A request's entities (the first id of each key feature in its rows) are looked up in that version;
an entity the store never saw reads as unseen (the student's "no history" vector), not an error.
The reloader refreshes the version as windows close. The FM is never called.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from exfm_ray.loopfm.builder import store_root
from exfm_ray.loopfm.features import history_columns
from exfm_ray.loopfm.store import StoreReader, StoreView
from exfm_ray.serving.rows import EncodedRows


class NewestStore:
    """The newest version of the LoopFM store under a storage root (None while there is none)."""

    def __init__(self, storage: str | Path):
        self.root = store_root(storage)
        self._reader: StoreReader | None = None
        self._view: StoreView | None = None
        self._lock = threading.Lock()  # loads and the reloader run in threads

    def view(self) -> StoreView | None:
        """The newest committed version, read from storage only when it moved."""
        with self._lock:
            if self._reader is None:
                self._reader = StoreReader.open(self.root)
                if self._reader is None:
                    return None
            latest = self._reader.latest()
            if latest is None:
                return None
            if self._view is None or self._view.version != latest:
                self._view = self._reader.version_view(latest)
            return self._view


def request_history(
    view: StoreView | None, keys: Sequence[str], parts: Sequence[EncodedRows]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows' histories ([B, keys, K, D], [B, keys]) from `view`; None (all unseen) without one
    or when the store does not hold one of the keys."""
    if view is None or any(k not in view.tables for k in keys):
        return None
    entities = {k: first_ids(parts, k) for k in keys}
    hist, kept = history_columns(view, list(keys), entities)
    return torch.from_numpy(hist), torch.from_numpy(kept)


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
