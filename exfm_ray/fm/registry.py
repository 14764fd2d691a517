"""FM versions: DCP checkpoints plus metadata, and a manifest saying which version is current.

The registry is a manifest on storage, not an actor: the FM training job writes it, the FM group
and the DAS read it, and it survives every process. Layout:

    <root>/fm/registry.json                 {"current": "fm-0003", "versions": ["fm-0001", ...]}
    <root>/fm/versions/<version>/           DCP files (*.distcp, .metadata) + version.json

One writer (the FM training job) at a time; readers never see a partial version because the
manifest is replaced atomically only after the version folder is complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.errors import ExfmError
from exfm_ray.files import atomic_write
from exfm_ray.fm.config import FMConfig
from exfm_ray.schema import StreamSpec

VERSION_FILE = "version.json"


class LeakageError(ExfmError):
    """An FM version trained on data at or after the window it would label."""


class FMVersion(Config):
    version: str = Field(description="Version id, e.g. fm-0003; increases with every publish.")
    path: str = Field(description="Folder of the DCP checkpoint.")
    watermark: int = Field(description="Last event time (unix s) in the data this version trained on.")
    through_window: int = Field(description="Last stream window trained on (-1: untrained).")
    spec: StreamSpec = Field(description="Stream spec the FM was built for (features, tables, heads).")
    fm: FMConfig = Field(description="FM config (sizes) the weights were built with.")
    plan: dict[str, str] = Field(default_factory=dict, description="Sharding type per table in the training job.")
    created_at: float = Field(default_factory=time.time, description="Publish time (unix s).")
    metrics: dict[str, float] = Field(default_factory=dict, description="Training metrics (e.g. last loss).")
    run: str = Field("", description="The training run that published it (a restarted run resumes after it).")

    @property
    def tables(self) -> list[dict]:
        from exfm_ray.fm.model import fm_tables

        return [
            {"name": t.name, "rows": t.num_embeddings, "dim": t.embedding_dim}
            for t in fm_tables(self.spec, self.fm.resolved().embedding_dim)
        ]


class FMRegistry:
    def __init__(self, root: str | Path):
        self.root = Path(root) / "fm"
        self.manifest = self.root / "registry.json"

    def _read(self) -> dict:
        if not self.manifest.exists():
            return {"current": None, "versions": []}
        return json.loads(self.manifest.read_text())

    def next_version(self) -> str:
        return self.next_versions(1)[0]

    def next_versions(self, n: int) -> list[str]:
        """Names of the next n versions (a streaming training job publishes several)."""
        count = len(self._read()["versions"])
        return [f"fm-{count + i:04d}" for i in range(1, n + 1)]

    def version_dir(self, version: str) -> Path:
        return self.root / "versions" / version

    def publish(self, meta: FMVersion, *, make_current: bool = True) -> FMVersion:
        """Record a complete version folder (checkpoint already written to meta.path)."""
        folder = Path(meta.path)
        if not (folder / ".metadata").exists():
            raise ExfmError(f"FM version {meta.version}: no DCP checkpoint in {folder}")
        (folder / VERSION_FILE).write_text(meta.model_dump_json(indent=2))
        data = self._read()
        if meta.version not in data["versions"]:
            data["versions"].append(meta.version)
        if make_current:
            data["current"] = meta.version
        atomic_write(self.manifest, json.dumps(data, indent=2))
        return meta

    def get(self, version: str) -> FMVersion:
        file = self.version_dir(version) / VERSION_FILE
        if not file.exists():
            raise ExfmError(f"unknown FM version {version!r} in {self.root}")
        return FMVersion.model_validate_json(file.read_text())

    def current(self) -> FMVersion | None:
        cur = self._read()["current"]
        return self.get(cur) if cur else None

    def versions(self) -> list[FMVersion]:
        return [self.get(v) for v in self._read()["versions"]]

    def for_window(self, window_start: int) -> FMVersion | None:
        """The newest version whose data watermark lies strictly before the window (leakage guard)."""
        ok = [v for v in self.versions() if v.watermark < window_start]
        return max(ok, key=lambda v: v.watermark) if ok else None


def fm_window_for(t: int, delay: int) -> int | None:
    """The streaming protocol's one rule: window t is labeled by the FM trained through window
    t - delay (its labels arrive `delay` windows late); None while no such FM can exist."""
    if delay < 1:
        raise ValueError(f"fm_delay must be >= 1 (got {delay}): an FM trained on window t must not label it")
    return t - delay if t >= delay else None


def window_labeled_by(k: int, delay: int) -> int:
    """The window the FM trained through window k labels (the inverse of fm_window_for)."""
    return k + delay


def check_no_leakage(version: FMVersion, window: int, window_start: int) -> None:
    if version.watermark >= window_start:
        raise LeakageError(
            f"FM version {version.version} trained on data up to unix time {version.watermark}, not strictly "
            f"before window {window} (starts {window_start}): labeling it would leak the window's labels"
        )


def publish_model(
    registry: FMRegistry,
    model,
    spec: StreamSpec,
    cfg: FMConfig,
    *,
    watermark: int,
    through_window: int,
    metrics: dict[str, float] | None = None,
) -> FMVersion:
    """Publish an unsharded, in-process FM (tests, small deployments); the Ray job saves sharded."""
    from exfm_ray.fm.sharding import save_checkpoint

    version = registry.next_version()
    path = registry.version_dir(version)
    save_checkpoint(model, path)
    meta = FMVersion(
        version=version,
        path=str(path),
        watermark=watermark,
        through_window=through_window,
        spec=spec,
        fm=cfg,
        metrics=metrics or {},
    )
    return registry.publish(meta)
