"""Fold committed augmented windows into the representation store, in window order, once each.

The single writer of a run's store (`exfm run`'s supervisor calls it after each DAS commit);
readers (tenant trainers, Serve replicas) only open committed versions. A window is read one
DAS unit file at a time (its rows in stream order inside the file, the files in unit order), so
the writer holds the store and one unit, never a whole window. That needs the units in time
order, as the DAS writes a stream written in time order; when their Parquet statistics say
otherwise, the window is read whole and sorted. Rows the FM did not embed are skipped, and an
event logged by several tenants (the same example_id) counts once: the DAS's layout contract
keeps the rows of one example in one unit file.
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
from exfm_ray.loopfm.store import RepresentationStore, StoreConfig, StoreReader, embeddings, entity_ids

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
    paths = augmented.window_files(t)
    if _in_time_order(paths):
        tables = (pq.read_table(path, columns=columns) for path in paths)
    else:  # units overlap in time (a stream written out of order): the window whole, sorted
        tables = iter([augmented.read_window(t, columns=columns)])
    for table in tables:
        table = table.filter(pc.is_valid(table.column(FM_EMB)))
        if table.num_rows == 0:
            continue
        table = table.sort_by([("event_time", "ascending"), ("example_id", "ascending")])
        _, first = np.unique(table.column("example_id").to_numpy(), return_index=True)
        table = table.take(np.sort(first))
        versions = sorted({v for v in table.column(FM_VERSION).to_pylist() if v})
        entities = {key: entity_ids(table, key) for key in store.cfg.keys}
        yield entities, embeddings(table, FM_EMB, store.dim), versions[-1] if versions else None


def _in_time_order(paths: list[Path]) -> bool:
    """Whether each unit file's events come at or after the previous file's (from the Parquet
    statistics, without reading rows); unknown counts as no."""
    previous = None
    for path in paths:
        span = _time_span(path)
        if span is None or (previous is not None and span[0] < previous):
            return False
        previous = span[1]
    return True


def _time_span(path: Path) -> tuple[int, int] | None:
    meta = pq.ParquetFile(path).metadata
    lows, highs = [], []
    for r in range(meta.num_row_groups):
        group = meta.row_group(r)
        stats = next(
            (group.column(j).statistics for j in range(group.num_columns)
             if group.column(j).path_in_schema == "event_time"),
            None,
        )  # fmt: skip
        if stats is None or not stats.has_min_max:
            return None
        lows.append(stats.min)
        highs.append(stats.max)
    return (min(lows), max(highs)) if lows else None


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


def check_readable(tenant: str, own: StoreConfig, store: StoreConfig) -> None:
    """A tenant can read a store that holds all its keys and at least its K (it reads its last K
    events; its pooling is its own)."""
    missing = [k for k in own.keys if k not in store.keys]
    if missing:
        raise ConfigError(
            f"tenant {tenant!r}: student.loopfm.store.keys {missing} are not in the run's LoopFM store "
            f"(it holds {store.keys}; a store's keys are fixed when it is first built)"
        )
    if own.k > store.k:
        raise ConfigError(f"tenant {tenant!r}: student.loopfm.store.k {own.k} is more than the run's LoopFM "
                          f"store keeps ({store.k}; fixed when it was first built)")  # fmt: skip


def open_run_store(storage: str | Path, tenants: list, dim: int) -> RepresentationStore | None:
    """The run's store for its LoopFM tenants (None when none reads one). An existing store keeps
    its config (a rerun after tenants came or went still reads it), and every LoopFM tenant must
    be able to read it; a new one is built for the tenants present."""
    wanted = store_config_for(tenants)
    if wanted is None:
        return None
    declared = StoreReader.open(store_root(storage))
    cfg = wanted if declared is None else declared.cfg
    for t in tenants:
        if t.distill().loopfm:
            check_readable(t.name, t.student.loopfm.store, cfg)
    return RepresentationStore(store_root(storage), cfg, dim)
