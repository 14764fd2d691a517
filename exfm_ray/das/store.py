"""Augmented windows on storage, and the manifest that makes them visible exactly once.

    <storage>/augmented/manifest.json              {"windows": {"<t>": WindowRecord}, "spec": ...}
    <storage>/augmented/window=<t>/*.parquet       committed output of window t
    <storage>/augmented/_staging/<run>/...         work in progress (never read)

A window is visible only once it is in the manifest. Commit = move the finished staging folder
to window=<t> (a rename), then record it in the manifest (atomic replace). A crash before the
rename leaves only staging debris; a crash between the two leaves a folder the manifest does not
list, which the next run replaces. Readers (tenant trainers) only open listed windows.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.das.columns import FM_EMB
from exfm_ray.errors import ExfmError
from exfm_ray.files import atomic_write
from exfm_ray.schema import StreamSpec


def parquet_options(schema: pa.Schema) -> dict:
    """Writer options for augmented rows. The FM outputs and the embedding are nearly all distinct
    floats: no dictionary for them (building one is wasted work), and no min/max statistics for the
    embedding (nobody filters on it). Measured: ~25% less write CPU, same file size. Snappy, as
    Parquet's default."""
    plain = {f.name for f in schema if pa.types.is_floating(f.type) or pa.types.is_fixed_size_list(f.type)}
    return {
        "use_dictionary": [_leaf(f) for f in schema if f.name not in plain],
        "write_statistics": [_leaf(f) for f in schema if f.name != FM_EMB],
        "compression": "snappy",
    }


def _leaf(field: pa.Field) -> str:
    """The Parquet column path of a flat or list-of-primitive field (what write_statistics matches)."""
    nested = pa.types.is_list(field.type) or pa.types.is_large_list(field.type)
    return f"{field.name}.list.element" if nested or pa.types.is_fixed_size_list(field.type) else field.name


class WindowRecord(Config):
    window: int = Field(description="Window index.")
    input_rows: int = Field(description="Tenant rows read from the stream window.")
    output_rows: int = Field(description="Augmented rows written (must equal input_rows).")
    fm_calls: int = Field(description="Examples the FM labeled (unique example_ids with an FM answer).")
    fm_versions: list[str] = Field(default_factory=list, description="FM versions that labeled rows.")
    masked_rows: int = Field(0, description="Rows with fm_mask False (no FM output or leakage guard).")
    unlabeled_rows: int = Field(0, description="Rows whose FM call failed after the configured wait.")
    duration_s: float = Field(0.0, description="Wall time of the window.")
    committed_at: float = Field(default_factory=time.time, description="Commit time (unix s).")
    label_join: dict[str, int] = Field(default_factory=dict, description="Delayed-label join counts.")

    @property
    def amortization(self) -> float:
        """FM calls per tenant row (1.0 = no sharing; lower = one FM call served several tenants)."""
        return self.fm_calls / max(self.input_rows, 1)


class AugmentedStore:
    def __init__(self, storage: str | Path):
        self.root = Path(storage) / "augmented"
        self.manifest = self.root / "manifest.json"

    def _read(self) -> dict:
        if not self.manifest.exists():
            return {"windows": {}, "spec": None}
        return json.loads(self.manifest.read_text())

    def spec(self) -> StreamSpec | None:
        data = self._read()["spec"]
        return StreamSpec.model_validate(data) if data else None

    def records(self) -> dict[int, WindowRecord]:
        return {int(t): WindowRecord.model_validate(r) for t, r in self._read()["windows"].items()}

    def committed(self) -> list[int]:
        return sorted(self.records())

    def window_dir(self, t: int) -> Path:
        return self.root / f"window={t}"

    def staging_dir(self, run: str) -> Path:
        return self.root / "_staging" / run

    def commit(self, t: int, staged: Path, record: WindowRecord, spec: StreamSpec) -> None:
        final = self.window_dir(t)
        if t in self.records():
            raise ExfmError(f"window {t} is already committed")
        if final.exists():  # left by a crash between rename and manifest: not visible, replace it
            shutil.rmtree(final)
        staged.rename(final)
        data = self._read()
        data["windows"][str(t)] = record.model_dump(mode="json")
        self._write(data, spec)

    def declare_spec(self, spec: StreamSpec) -> None:
        """Record the stream's spec before its first window is committed, so readers waiting for
        windows can build their models ahead (the DAS commits it with every window anyway)."""
        self._write(self._read(), spec)

    def _write(self, data: dict, spec: StreamSpec) -> None:
        data["spec"] = spec.model_dump(mode="json")
        atomic_write(self.manifest, json.dumps(data, indent=1))

    def clear_staging(self) -> None:
        shutil.rmtree(self.root / "_staging", ignore_errors=True)

    def window_files(self, t: int) -> list[Path]:
        """A committed window's files, one per DAS unit, in unit order."""
        return sorted(self.window_dir(t).glob("*.parquet"))

    def read_window(self, t: int, tenant: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """A committed window (optionally one tenant's rows), in stream order."""
        if t not in self.records():
            raise ExfmError(f"augmented window {t} is not committed in {self.root}")
        files = self.window_files(t)
        table = pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
        table = table.sort_by([("event_time", "ascending"), ("example_id", "ascending")])
        if tenant is not None:
            table = table.filter(pc.equal(table.column("tenant"), tenant))
        return table
