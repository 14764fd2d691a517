"""Fold committed augmented windows into the representation store, in window order, once each.

The single writer of a run's store (`exfm run`'s supervisor calls it after each DAS commit);
readers (tenant trainers, Serve replicas) only open committed versions. A window is read one
DAS unit file at a time (its rows in stream order inside the file, the files in unit order), so
the writer holds the store and one unit, never a whole window. Rows the FM did not embed are
skipped, and an event logged by several tenants (the same example_id) counts once: the DAS's
layout contract keeps the rows of one example in one unit file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exfm_ray.das.columns import FM_EMB, FM_VERSION
from exfm_ray.das.store import AugmentedStore
from exfm_ray.errors import ConfigError
from exfm_ray.loopfm.store import RepresentationStore, StoreConfig, embeddings, entity_ids

STORE_DIR = "loopfm"


def store_root(storage: str | Path) -> Path:
    """Where a run keeps its representation store (beside augmented/, students/)."""
    return Path(storage) / STORE_DIR


def fold_augmented(augmented: AugmentedStore, store: RepresentationStore) -> list[int]:
    """Fold every committed augmented window after the store's last version; stop at the first
    window not yet committed (versions must follow the stream). Returns the windows folded."""
    committed = set(augmented.committed())
    folded = []
    t = store.window + 1
    while t in committed:
        store.fold_parts(t, _unit_parts(augmented, t, store))
        folded.append(t)
        t += 1
    return folded


def _unit_parts(augmented: AugmentedStore, t: int, store: RepresentationStore) -> Iterator:
    columns = ["example_id", "event_time", *store.cfg.keys, FM_EMB, FM_VERSION]
    for path in augmented.window_files(t):
        table = pq.read_table(path, columns=columns)
        table = table.filter(pc.is_valid(table.column(FM_EMB)))
        if table.num_rows == 0:
            continue
        table = table.sort_by([("event_time", "ascending"), ("example_id", "ascending")])
        _, first = np.unique(table.column("example_id").to_numpy(), return_index=True)
        table = table.take(np.sort(first))
        versions = sorted({v for v in table.column(FM_VERSION).to_pylist() if v})
        entities = {key: entity_ids(table, key) for key in store.cfg.keys}
        yield entities, embeddings(table, FM_EMB, store.dim), versions[-1] if versions else None


def store_config_for(tenants: list) -> StoreConfig | None:
    """The store a run's LoopFM tenants need (None when no tenant reads one): the union of their
    keys, the largest K and bound, float32 if any asks for it. Each tenant reads its own keys."""
    wanted = [t.student.loopfm.store for t in tenants if t.distill().loopfm]
    if not wanted:
        return None
    keys = list(dict.fromkeys(k for cfg in wanted for k in cfg.keys))
    return StoreConfig(
        keys=keys,
        k=max(cfg.k for cfg in wanted),
        max_entities=max(cfg.max_entities for cfg in wanted),
        dtype="float32" if any(cfg.dtype == "float32" for cfg in wanted) else "float16",
    )


def check_readable(tenant: str, keys: list[str], store: StoreConfig) -> None:
    """A tenant can read a store holding all its keys (its K and pooling are its own)."""
    missing = [k for k in keys if k not in store.keys]
    if missing:
        raise ConfigError(
            f"tenant {tenant!r}: student.loopfm.store.keys {missing} are not in the run's LoopFM store "
            f"(it holds {store.keys})"
        )
