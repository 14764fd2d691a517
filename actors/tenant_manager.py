"""The tenant manager: runs every registered tenant's Ray Train run, several at once, and takes
new tenants while it runs.

A plain class (actors/launch.py makes it a named async actor). Each tenant's TorchTrainer.fit()
runs in its own Ray task, so a slow or failing tenant holds only its own workers; at most
`max_concurrent` runs hold resources at a time, the rest queue. A tenant added while the manager
runs (`exfm tenants add`) gets its run at once; a removed tenant's run stops after its window.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import Field

from actors.remote import fit_tenant_task
from exfm_ray.configbase import Config
from exfm_ray.das.store import AugmentedStore
from exfm_ray.errors import ConfigError
from exfm_ray.observability import LOG
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.registry import TenantEntry, TenantRegistry
from exfm_ray.tenants.trainer import TenantRunConfig, WindowPlan


class TenantManagerConfig(Config):
    name: str = Field("exfm-tenants", description="Ray actor name (`exfm tenants add` finds the manager by it).")
    namespace: str = Field("exfm", description="Ray namespace of the manager.")
    storage: str = Field(description="Storage root: augmented windows, tenant registry, published students.")
    max_concurrent: int = Field(4, ge=1, description="Tenant runs holding resources at the same time.")
    poll_s: float = Field(1.0, gt=0, description="How often a following run looks for the next window.")


class TenantManager:
    def __init__(self, cfg: TenantManagerConfig):
        self.cfg = cfg
        self.registry = TenantRegistry(cfg.storage)
        self.slots = asyncio.Semaphore(cfg.max_concurrent)
        self.plan: WindowPlan | None = None  # the windows of the current train() call
        self.runs: dict[str, dict] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    async def train(self, first_window: int, last_window: int | None, follow: bool = False) -> dict:
        """Train every active tenant over the windows (and any tenant added meanwhile); returns
        when all runs have ended, with one summary per tenant."""
        self.plan = WindowPlan(first_window=first_window, last_window=last_window, follow=follow)
        try:
            for entry in self.registry.active():
                self._launch(entry)
            while any(not t.done() for t in self.tasks.values()):
                await asyncio.wait([t for t in self.tasks.values() if not t.done()])
        finally:
            self.plan = None
        return self.status()

    async def add(self, cfg: dict, replace: bool = False) -> dict:
        """Register a tenant (validated against the stream) and, while training, start its run."""
        tenant = TenantConfig.parse(cfg, source="tenant config")
        spec = AugmentedStore(self.cfg.storage).spec()
        if spec is not None:
            resolve(tenant, spec)
        if replace and tenant.name in self.tasks and not self.tasks[tenant.name].done():
            raise ConfigError(f"tenant {tenant.name!r} is training; remove it and add it again")
        entry = self.registry.add(tenant, replace=replace)
        if self.plan is not None:
            self._launch(entry)
        return entry.model_dump(mode="json")

    async def remove(self, name: str) -> dict:
        """Mark removed: its run ends after the window in progress."""
        return self.registry.remove(name).model_dump(mode="json")

    def status(self) -> dict:
        plan = self.plan.model_dump() if self.plan is not None else None
        return {"training": self.plan is not None, "plan": plan, "runs": dict(self.runs)}

    def _launch(self, entry: TenantEntry) -> None:
        name = entry.config.name
        if name in self.tasks and not self.tasks[name].done():
            return
        assert self.plan is not None
        run_cfg = TenantRunConfig(
            storage=self.cfg.storage, entry=entry, poll_s=self.cfg.poll_s, **self.plan.model_dump()
        )
        self.runs[name] = {"status": "queued", "run": entry.run_name, "queued_at": time.time()}
        self.tasks[name] = asyncio.get_running_loop().create_task(self._run(name, run_cfg))

    async def _run(self, name: str, run_cfg: TenantRunConfig) -> None:
        state = self.runs[name]
        async with self.slots:
            state.update(status="running", started_at=time.time())
            try:
                result = await fit_tenant_task().remote(run_cfg)
            except Exception as exc:  # one tenant's failure is its own; the others keep training
                state.update(status="failed", error=_message(exc), ended_at=time.time())
                LOG.error("tenant %s failed: %s", name, state["error"])
                return
            state.update(status="finished", result=result, ended_at=time.time())


def _message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return f"{type(cause or exc).__name__}: {cause or exc}"[:500]
