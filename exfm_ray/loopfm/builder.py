"""Fold committed augmented windows into the representation store, in window order, once each.

The single writer of a run's store (the whole-loop supervisor calls it after each DAS commit);
readers (tenant trainers, Serve replicas) only open committed versions. Rows the FM did not
embed are skipped, and an event logged by two tenants (the same example_id) counts once.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from exfm_ray.das.columns import FM_EMB, FM_VERSION
from exfm_ray.das.store import AugmentedStore
from exfm_ray.loopfm.store import RepresentationStore


def fold_augmented(augmented: AugmentedStore, store: RepresentationStore) -> list[int]:
    """Fold every committed augmented window after the store's last version; stop at the first
    window not yet committed (versions must follow the stream). Returns the windows folded."""
    committed = set(augmented.committed())
    folded = []
    t = store.window + 1
    while t in committed:
        table = augmented.read_window(t, columns=["example_id", "event_time", *store.cfg.keys, FM_EMB, FM_VERSION])
        table = table.filter(pc.is_valid(table.column(FM_EMB)))
        _, first = np.unique(table.column("example_id").to_numpy(), return_index=True)
        table = table.take(np.sort(first))
        versions = sorted({v for v in table.column(FM_VERSION).to_pylist() if v})
        store.fold_window(t, table, FM_EMB, versions[-1] if versions else None)
        folded.append(t)
        t += 1
    return folded
