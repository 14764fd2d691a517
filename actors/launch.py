"""The one place where actor classes become Ray actors, and how jobs find them."""

from __future__ import annotations

import ray

from actors.fm_group import FMGroup, FMGroupConfig
from actors.remote import beside_the_caller
from actors.tenant_manager import TenantManager
from exfm_ray.errors import ExfmError


def start_fm_group(cfg: FMGroupConfig, *, version: str | None = None, detached: bool = True):
    """Create the named supervisor (detached: it outlives the job that started it) and its gangs."""
    if find_fm_group(cfg.name, cfg.namespace) is not None:
        raise ExfmError(f"an FM group named {cfg.name!r} is already running in namespace {cfg.namespace!r}")
    handle = (
        ray.remote(FMGroup)
        .options(
            name=cfg.name,
            namespace=cfg.namespace,
            lifetime="detached" if detached else None,
            num_cpus=0,
            max_concurrency=1000,
            scheduling_strategy=beside_the_caller(),
        )
        .remote(cfg)
    )
    ray.get(handle.start.remote(version))
    return handle


def find_fm_group(name: str = "exfm-fm", namespace: str = "exfm"):
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def get_fm_group(name: str = "exfm-fm", namespace: str = "exfm"):
    handle = find_fm_group(name, namespace)
    if handle is None:
        raise ExfmError(
            f"no FM group named {name!r} is running in namespace {namespace!r}; start one with exfm fm start"
        )
    return handle


def stop_fm_group(name: str = "exfm-fm", namespace: str = "exfm") -> bool:
    handle = find_fm_group(name, namespace)
    if handle is None:
        return False
    ray.get(handle.shutdown.remote())
    ray.kill(handle, no_restart=True)
    return True


def start_tenant_manager(cfg, *, detached: bool = False):
    """The named tenant manager; `exfm tenants add` on a running system talks to it."""
    if find_tenant_manager(cfg.name, cfg.namespace) is not None:
        raise ExfmError(f"a tenant manager named {cfg.name!r} is already running; wait for it or stop it")
    return (
        ray.remote(TenantManager)
        .options(
            name=cfg.name,
            namespace=cfg.namespace,
            lifetime="detached" if detached else None,
            num_cpus=0,
            max_concurrency=100,
            scheduling_strategy=beside_the_caller(),
            # The runs' fit() calls wait in the manager's threads, and Ray Train hands these to each
            # run's controller. The preemption watcher is one more Python process per run (~200 MB)
            # to end a run gracefully before a node drains; a tenant's run needs no warning: a lost
            # worker is restarted and its tenants resume from their state files.
            runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}},
        )
        .remote(cfg)
    )


def find_tenant_manager(name: str = "exfm-tenants", namespace: str = "exfm"):
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
