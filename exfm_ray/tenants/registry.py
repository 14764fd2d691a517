"""The tenant registry: a manifest on shared storage, like the FM registry.

    <storage>/tenants/registry.json        {"tenants": {name: TenantEntry}}
    <storage>/tenants/<name>/progress.json what its trainer is doing now (window, batch, pid)
    <storage>/tenants/<name>/metrics.json  per-window metrics of its latest state
    <storage>/tenants/<name>/state.pt      its resume point (exfm_ray/tenants/outputs.py)
    <storage>/tenant-runs/<run>/           a Ray Train run hosting tenants: members.json (which
                                           tenants it trains, written by the tenant manager), yield

Why a manifest and not an actor: the registry must outlive every process (jobs, the tenant
manager, the cluster), and the trainers, the CLI and serving only ever read it. Writes are
read-modify-write under an exclusive file lock, then an atomic replace, so concurrent `exfm
tenants add` calls cannot lose each other's entries and readers never see a partial file.
What a trainer produces (progress, metrics, published checkpoints) lives in the tenant's own
files, each with one writer, so trainers never contend for the manifest.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.errors import ConfigError
from exfm_ray.files import atomic_write
from exfm_ray.tenants.config import TenantConfig

Status = Literal["active", "removed"]


class TenantEntry(Config):
    config: TenantConfig = Field(description="The tenant's config as registered.")
    status: Status = Field("active", description="active: trains (and is served); removed: stopped.")
    generation: int = Field(
        1, ge=1, description="Bumped when a removed tenant is added again: its training starts afresh."
    )
    added_at: float = Field(default_factory=time.time, description="When it was (last) added (unix s).")
    updated_at: float = Field(default_factory=time.time, description="Last change of the entry (unix s).")

    @property
    def run_name(self) -> str:
        """This registration of the tenant (name and generation): its state and versions carry it."""
        return f"{self.config.name}-g{self.generation}"


class TenantRegistry:
    def __init__(self, storage: str | Path):
        self.root = Path(storage) / "tenants"
        self.manifest = self.root / "registry.json"

    def tenant_dir(self, name: str) -> Path:
        return self.root / name

    def progress_path(self, name: str) -> Path:
        return self.tenant_dir(name) / "progress.json"

    def run_dir(self, key: str) -> Path:
        """Files of one Ray Train run hosting tenants (keys: `solo-<tenant>`, `group-<n>`)."""
        return self.root.parent / "tenant-runs" / key

    def members_path(self, key: str) -> Path:
        """The tenants the run trains (a JSON list of names): the manager adds to it while it runs."""
        return self.run_dir(key) / "members.json"

    def yield_path(self, key: str) -> Path:
        """Present while the tenant manager asks the run to give up its slot after its current window."""
        return self.run_dir(key) / "yield"

    def dropped_path(self, key: str) -> Path:
        """Members the run let go of and why ({name: {run, phase, error, updated_at}}): the tenant
        manager reads this one file per run and poll, not every member's progress."""
        return self.run_dir(key) / "dropped.json"

    def dropped(self, key: str) -> dict:
        return self.read_json(self.dropped_path(key)) or {}

    def metrics_path(self, name: str) -> Path:
        return self.tenant_dir(name) / "metrics.json"

    def entries(self) -> dict[str, TenantEntry]:
        if not self.manifest.exists():
            return {}
        data = json.loads(self.manifest.read_text())
        return {n: TenantEntry.model_validate(e) for n, e in data["tenants"].items()}

    def active(self) -> list[TenantEntry]:
        return [e for e in self.entries().values() if e.status == "active"]

    def get(self, name: str) -> TenantEntry:
        entry = self.entries().get(name)
        if entry is None:
            raise ConfigError(f"unknown tenant {name!r}; registered: {sorted(self.entries())}")
        return entry

    def add(self, cfg: TenantConfig, *, replace: bool = False) -> TenantEntry:
        """Register a tenant. An active tenant of that name is an error unless `replace` (same run,
        new config); a removed one comes back as a new generation (fresh training)."""
        with self._locked() as data:
            old = data.get(cfg.name)
            if old is not None and old.status == "active" and not replace:
                raise ConfigError(f"tenant {cfg.name!r} is already registered (remove it first, or replace it)")
            generation = old.generation + (old.status == "removed") if old is not None else 1
            entry = TenantEntry(config=cfg, generation=generation)
            data[cfg.name] = entry
        return entry

    def remove(self, name: str) -> TenantEntry:
        with self._locked() as data:
            if name not in data or data[name].status == "removed":
                raise ConfigError(
                    f"no active tenant {name!r}; active: {sorted(n for n, e in data.items() if e.status == 'active')}"
                )
            data[name] = data[name].replace(status="removed", updated_at=time.time())
            return data[name]

    def history(self, name: str) -> list[dict]:
        """The tenant's per-window metrics, oldest first (empty before its first window)."""
        return self.read_json(self.metrics_path(name)) or []

    def progress(self, name: str) -> dict:
        """What the tenant's run is doing now (empty before it starts)."""
        return self.read_json(self.progress_path(name)) or {}

    def read_json(self, path: Path) -> dict | list | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    @contextmanager
    def _locked(self) -> Iterator[dict[str, TenantEntry]]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.entries()
            yield data
            payload = {"tenants": {n: e.model_dump(mode="json") for n, e in sorted(data.items())}}
            atomic_write(self.manifest, json.dumps(payload, indent=1))
