"""LoopFM's representation store: the FM's embeddings of past events, folded per entity.

    <root>/manifest.json                 {"config": StoreConfig, "dim": D, "versions": {"<t>": StoreVersion}}
    <root>/version=<t>/<key>.parquet     entity, emb (last K, oldest first), n, last_window

Version t holds every window <= t. Rows of window t read version t-1 (or older), never t: the
store is what the FM had said about an entity before the row happened, the same boundary as the
stream's "train on t, evaluate on t+1". A version is written once: the folder is written under
_staging and renamed, then the manifest records it (the augmented windows' protocol); folding a
window that is already committed is refused, so a rerun never rewrites history.

One writer (RepresentationStore, in the process that commits the DAS's windows) and any number
of readers (StoreReader: tenant trainers, Serve replicas), which only open committed versions.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.errors import ConfigError, DataError
from exfm_ray.files import atomic_write


class StoreConfig(Config):
    keys: list[str] = Field(
        default_factory=lambda: ["user_id"],
        min_length=1,
        description="Entity columns the store is keyed by (sparse features; a row's entity is the list's first id).",
    )
    k: int = Field(8, ge=1, le=256, description="Embeddings kept per entity: its last K events, oldest evicted.")
    max_entities: int = Field(
        200_000, ge=1, description="Entities kept per key; beyond it, those seen least recently are evicted."
    )
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage type of the embeddings (float16 halves the store; reads return float32)."
    )


class StoreVersion(Config):
    window: int = Field(description="The last window folded into this version.")
    fm_versions: list[str] = Field(default_factory=list, description="FM versions whose embeddings it holds.")
    entities: dict[str, int] = Field(description="Entities stored, per key.")
    bytes: int = Field(description="Size of the version's files on storage.")


class KeyTable:
    """One key's entities: a ring of their last K embeddings, how many they have seen, and when."""

    def __init__(self, k: int, dim: int, dtype: str):
        self.k, self.dim, self.dtype = k, dim, np.dtype(dtype)
        self.index: dict[int, int] = {}
        self.emb = np.zeros((0, k, dim), self.dtype)  # oldest first, zero-padded in front
        self.n = np.zeros(0, np.int64)
        self.last = np.zeros(0, np.int64)

    def fold(self, ids: np.ndarray, emb: np.ndarray, window: int) -> None:
        """Append the window's embeddings, in row order, to their entities' histories."""
        if len(ids) == 0:
            return
        new = [int(e) for e in dict.fromkeys(ids.tolist()) if int(e) not in self.index]
        if new:
            base = len(self.index)
            self.index.update({e: base + i for i, e in enumerate(new)})
            self.emb = np.concatenate([self.emb, np.zeros((len(new), self.k, self.dim), self.dtype)])
            self.n = np.concatenate([self.n, np.zeros(len(new), np.int64)])
            self.last = np.concatenate([self.last, np.zeros(len(new), np.int64)])
        rows = np.fromiter((self.index[int(e)] for e in ids), np.int64, len(ids))
        order = np.argsort(rows, kind="stable")  # each entity's events stay in stream order
        rows, emb = rows[order], emb[order]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        counts = np.diff(np.r_[starts, len(rows)])
        for s, c in zip(starts, counts, strict=True):
            r, take = rows[s], min(c, self.k)
            recent = emb[s + c - take : s + c].astype(self.dtype)
            self.emb[r] = np.concatenate([self.emb[r][take:], recent])
        self.n[rows[starts]] += counts
        self.last[rows[starts]] = window

    def evict(self, max_entities: int) -> None:
        """Keep the `max_entities` seen most recently (ties: the more events)."""
        if len(self.index) <= max_entities:
            return
        keep = np.lexsort((self.n, self.last))[-max_entities:]
        keep.sort()
        ids = np.array(list(self.index), np.int64)[np.argsort(list(self.index.values()))]
        self.emb, self.n, self.last = self.emb[keep], self.n[keep], self.last[keep]
        self.index = {int(e): i for i, e in enumerate(ids[keep])}

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(history [N, K, D] float32, events kept [N]); unknown entities have 0 events."""
        rows = np.fromiter((self.index.get(int(e), -1) for e in ids), np.int64, len(ids))
        known = rows >= 0
        hist = np.zeros((len(ids), self.k, self.dim), np.float32)
        hist[known] = self.emb[rows[known]]
        kept = np.zeros(len(ids), np.int64)
        kept[known] = np.minimum(self.n[rows[known]], self.k)
        return hist, kept

    def to_arrow(self) -> pa.Table:
        ids = np.array(list(self.index), np.int64)[np.argsort(list(self.index.values()))]
        flat = pa.array(self.emb.reshape(-1), pa.float16() if self.dtype == np.float16 else pa.float32())
        emb = pa.FixedSizeListArray.from_arrays(flat, self.k * self.dim)
        return pa.table({"entity": ids, "emb": emb, "n": self.n, "last_window": self.last})

    @classmethod
    def from_arrow(cls, table: pa.Table, k: int, dim: int, dtype: str) -> KeyTable:
        kt = cls(k, dim, dtype)
        ids = table.column("entity").to_numpy()
        kt.index = {int(e): i for i, e in enumerate(ids)}
        flat = table.column("emb").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        kt.emb = flat.astype(kt.dtype).reshape(len(ids), k, dim)
        kt.n = table.column("n").to_numpy().astype(np.int64)
        kt.last = table.column("last_window").to_numpy().astype(np.int64)
        return kt


class StoreReader:
    """A store's committed versions, read-only (what trainers and Serve replicas open)."""

    def __init__(self, root: str | Path, cfg: StoreConfig, dim: int):
        self.root, self.cfg, self.dim = Path(root), cfg, dim
        self._last: StoreView | None = None  # versions never change: the last one read is kept

    @classmethod
    def open(cls, root: str | Path) -> StoreReader | None:
        """The store under `root` as its writer declared it; None when there is none."""
        raw = _read_manifest(Path(root))
        if raw is None or "config" not in raw:
            return None
        return cls(root, StoreConfig.model_validate(raw["config"]), int(raw["dim"]))

    def manifest(self) -> dict[str, StoreVersion]:
        raw = _read_manifest(self.root)
        versions = raw["versions"] if raw else {}
        return {t: StoreVersion.model_validate(v) for t, v in versions.items()}

    def latest(self, before: int | None = None) -> int | None:
        """The newest committed version (older than window `before`, when given)."""
        ts = [int(t) for t in self.manifest() if before is None or int(t) < before]
        return max(ts) if ts else None

    def view(self, window: int) -> StoreView:
        """What rows of `window` may see: the newest version before it (empty when none)."""
        return self.version_view(self.latest(before=window))

    def version_view(self, version: int | None) -> StoreView:
        """One committed version (None: the empty store); readers of one version share one copy."""
        if version is None:
            return StoreView(None, {k: KeyTable(self.cfg.k, self.dim, self.cfg.dtype) for k in self.cfg.keys})
        if self._last is None or self._last.version != version:
            self._last = StoreView(version, self._read(version))
        return self._last

    def _read(self, version: int) -> dict[str, KeyTable]:
        folder = self.root / f"version={version}"
        return {
            key: KeyTable.from_arrow(pq.read_table(folder / f"{key}.parquet"), self.cfg.k, self.dim, self.cfg.dtype)
            for key in self.cfg.keys
        }


Entities = dict[str, tuple[np.ndarray, np.ndarray]]  # per key: (first ids [N], has an id [N])


class RepresentationStore(StoreReader):
    """The store's one writer: fold a window's rows in, commit a version; reads as StoreReader.

    Opening a store that exists with another config or embedding size is refused: its versions
    were folded with those and a reader could not tell."""

    def __init__(self, root: str | Path, cfg: StoreConfig, dim: int):
        super().__init__(root, cfg, dim)
        declared = StoreReader.open(root)
        if declared is not None and (declared.cfg != cfg or declared.dim != dim):
            raise ConfigError(
                f"the LoopFM store at {root} was built with {declared.cfg.model_dump()} and dim {declared.dim}, "
                f"not {cfg.model_dump()} and dim {dim}"
            )
        self.tables = {key: KeyTable(cfg.k, dim, cfg.dtype) for key in cfg.keys}
        self.window = -1
        self.fm_versions: list[str] = []
        latest = self.latest()
        if latest is not None:
            self._load(latest)
        elif declared is None:
            self._write_manifest({})  # readers can size their models before the first version

    def fold_window(self, window: int, table: pa.Table, emb_column: str = "fm_emb", fm_version: str | None = None):
        """Fold window `window`'s rows (key columns + embeddings) in and commit version `window`."""
        entities = {key: entity_ids(table, key) for key in self.tables}
        self.fold_arrays(window, entities, embeddings(table, emb_column, self.dim), fm_version)

    def fold_arrays(self, window: int, entities: Entities, emb: np.ndarray, fm_version: str | None = None) -> None:
        """fold_window from arrays: per key (first ids [N], has an id [N]) and embeddings [N, D]."""
        self.fold_parts(window, [(entities, emb, fm_version)])

    def fold_parts(self, window: int, parts: Iterable[tuple[Entities, np.ndarray, str | None]]) -> None:
        """Fold a window given in parts, in stream order (each part: entities, embeddings [N, D],
        the FM version that made them), then evict and commit version `window`. A window with no
        parts (the FM embedded none of its rows) still commits a version: readers wait for it."""
        if window <= self.window or str(window) in self.manifest():
            raise ConfigError(f"store version {window} is already committed (the store holds up to {self.window})")
        try:
            for entities, emb, fm_version in parts:
                for key, kt in self.tables.items():
                    ids, present = entities[key]
                    kt.fold(ids[present], emb[present], window)
                if fm_version and fm_version not in self.fm_versions:
                    self.fm_versions = [*self.fm_versions, fm_version]
            for kt in self.tables.values():
                kt.evict(self.cfg.max_entities)
            self._commit(window)
        except BaseException:
            self._reset()  # half a window folded, or not committed: back to the last committed version
            raise
        self.window = window

    def view(self, window: int) -> StoreView:
        """As StoreReader.view; the newest version is the writer's live tables (no copy), so read
        it before folding the next window in, as the one-process experiment does."""
        version = self.latest(before=window)
        if version is not None and version == self.window:
            return StoreView(version, self.tables)
        return self.version_view(version)

    def _commit(self, window: int) -> None:
        staging = self.root / "_staging" / f"version={window}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for key, kt in self.tables.items():
            # embeddings are distinct floats: a dictionary would only cost time
            pq.write_table(kt.to_arrow(), staging / f"{key}.parquet", use_dictionary=["entity"])
        final = self.root / f"version={window}"
        shutil.rmtree(final, ignore_errors=True)  # debris of a crash between rename and manifest
        staging.rename(final)
        size = sum(p.stat().st_size for p in final.iterdir())
        versions = {t: v.model_dump() for t, v in self.manifest().items()}
        versions[str(window)] = StoreVersion(
            window=window,
            fm_versions=self.fm_versions,
            entities={key: len(kt.index) for key, kt in self.tables.items()},
            bytes=size,
        ).model_dump()
        self._write_manifest(versions)

    def _write_manifest(self, versions: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"config": self.cfg.model_dump(), "dim": self.dim, "versions": versions}
        atomic_write(self.root / "manifest.json", json.dumps(data, indent=1))

    def _reset(self) -> None:
        latest = self.latest()
        if latest is None:
            self.tables = {key: KeyTable(self.cfg.k, self.dim, self.cfg.dtype) for key in self.cfg.keys}
            self.window, self.fm_versions = -1, []
        else:
            self._load(latest)

    def _load(self, version: int) -> None:
        self.tables = self._read(version)
        self.window = version
        self.fm_versions = self.manifest()[str(version)].fm_versions


class StoreView:
    """One committed version, read-only: the histories a student's rows (or a request) see."""

    def __init__(self, version: int | None, tables: dict[str, KeyTable]):
        self.version, self.tables = version, tables

    def history(self, key: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.tables[key].lookup(ids)


def _read_manifest(root: Path) -> dict | None:
    path = root / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def embeddings(table: pa.Table, column: str, dim: int) -> np.ndarray:
    if column not in table.column_names:
        raise DataError("missing column (the DAS writes the FM embedding there)", column=column)
    col = table.column(column).combine_chunks()
    if col.null_count:
        raise DataError(f"{col.null_count} rows have no embedding", column=column)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if flat.size != len(table) * dim:
        raise DataError(f"expected {dim} floats per row, got {flat.size / max(len(table), 1):g}", column=column)
    return flat.reshape(len(table), dim)


def entity_ids(table: pa.Table, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The first id of each row's `key` list, and whether the row has one."""
    if key not in table.column_names:
        raise DataError("missing entity column for the representation store", column=key)
    col = table.column(key).combine_chunks()
    lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    offsets = col.offsets.to_numpy()[:-1]
    values = col.values.to_numpy(zero_copy_only=False)
    present = lengths > 0
    ids = np.zeros(len(table), np.int64)
    ids[present] = values[offsets[present]]
    return ids, present
