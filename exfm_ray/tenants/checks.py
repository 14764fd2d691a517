"""Checks a command runs before it starts anything: a tenant config against the stream, a training
request against what is registered and committed. Each failure names what is missing (ConfigError)."""

from __future__ import annotations

from pathlib import Path

from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.stream import read_spec
from exfm_ray.errors import ConfigError
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.registry import TenantRegistry


def validate(cfg: dict, storage: Path, stream: Path | None, source: str):
    """Parse and check a tenant config against the augmented stream (or --stream) before anything runs."""
    tenant = TenantConfig.parse(cfg, source=source)
    spec = AugmentedStore(storage).spec() or (read_spec(stream) if stream else None)
    if spec is None:
        raise ConfigError(f"nothing augmented in {storage} yet: pass --stream to check the tenant against the stream")
    resolve(tenant, spec)
    return tenant


def check_ready(storage: Path, first: int, last: int | None, follow: bool) -> list[str]:
    """Refuse early, naming what is missing; returns the active tenants."""
    active = TenantRegistry(storage).active()
    if not active:
        raise ConfigError(f"no tenants registered in {storage}: exfm tenants add NAME [--config tenant.yaml]")
    store = AugmentedStore(storage)
    spec = store.spec()
    if spec is not None:
        for entry in active:
            resolve(entry.config, spec)
    if not follow:
        missing = [t for t in range(first, (last or first) + 1) if t not in store.records()]
        if missing:
            raise ConfigError(
                f"augmented windows {missing} are not committed in {storage}: run exfm augment, or --follow"
            )
    return [e.config.name for e in active]
