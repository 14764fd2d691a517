"""The tenant manager: runs every registered tenant's Ray Train run, several at once, and takes
new tenants while it runs.

A plain class (actors/launch.py makes it a named async actor). Each tenant's TorchTrainer.fit()
runs in its own Ray task, so a slow or failing tenant holds only its own workers; at most
`max_concurrent` runs hold resources at a time, the rest queue. A tenant added while the manager
runs (`exfm tenants add`) gets its run at once; a removed tenant's run stops after its window.

No starvation when following the stream: a following run never ends by itself, so while a tenant
waits for a slot the manager asks the run that has held one longest to yield after its current
window (a file in its tenant folder). The yielded tenant is started again, at the back of the
queue, as soon as a window it has not trained is committed; it resumes from its checkpoint. Every
tenant therefore trains every committed window within about ceil(tenants / max_concurrent)
window-trainings (plus run start-ups) of its commit, however many tenants there are.
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
        when all runs have ended (following an unbounded stream: never), one summary per tenant."""
        self.plan = WindowPlan(first_window=first_window, last_window=last_window, follow=follow)
        try:
            for entry in self.registry.active():
                self._launch(entry)
            while True:
                if follow:
                    self._relaunch_behind()
                    self._make_room()
                live = [t for t in self.tasks.values() if not t.done()]
                if not live and (not follow or self._all_through(last_window)):
                    break
                if live:
                    await asyncio.wait(live, timeout=self.cfg.poll_s, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(self.cfg.poll_s)
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

    def _next_window(self, name: str) -> int:
        assert self.plan is not None
        history = self.registry.history(name)
        return max(self.plan.first_window, history[-1]["window"] + 1) if history else self.plan.first_window

    def _relaunch_behind(self) -> None:
        """Start a run for every tenant without one that has a committed window left to train."""
        assert self.plan is not None
        committed = set(AugmentedStore(self.cfg.storage).records())
        for entry in self.registry.active():
            name = entry.config.name
            state = self.runs.get(name, {})
            if name in self.tasks and not self.tasks[name].done():
                continue
            if state.get("status") == "failed" and state.get("generation") == entry.generation:
                continue  # it failed on this config: `exfm tenants add --replace` gives it another try
            t = self._next_window(name)
            if t in committed and (self.plan.last_window is None or t <= self.plan.last_window):
                self._launch(entry)

    def _make_room(self) -> None:
        """For each tenant waiting for a slot, ask the run that has held one longest to yield."""
        waiting = sum(1 for r in self.runs.values() if r["status"] == "queued")
        asked = sum(1 for r in self.runs.values() if r["status"] == "running" and r.get("yield_requested"))
        running = sorted(
            (r.get("started_at", 0.0), n)
            for n, r in self.runs.items()
            if r["status"] == "running" and not r.get("yield_requested")
        )
        for _, name in running[: max(0, waiting - asked)]:
            path = self.registry.yield_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)  # a run that has not written anything yet
            path.touch()
            self.runs[name]["yield_requested"] = True

    def _all_through(self, last_window: int | None) -> bool:
        """Every active tenant trained through last_window or failed on its current config."""
        if last_window is None:
            return False
        for entry in self.registry.active():
            state = self.runs.get(entry.config.name, {})
            failed = state.get("status") == "failed" and state.get("generation") == entry.generation
            if not failed and self._next_window(entry.config.name) <= last_window:
                return False
        return True

    def status(self) -> dict:
        plan = self.plan.model_dump() if self.plan is not None else None
        return {"training": self.plan is not None, "plan": plan, "runs": dict(self.runs)}

    def _launch(self, entry: TenantEntry) -> None:
        name = entry.config.name
        if name in self.tasks and not self.tasks[name].done():
            return
        assert self.plan is not None
        self.registry.yield_path(name).unlink(missing_ok=True)  # a request meant for an earlier run
        run_cfg = TenantRunConfig(
            storage=self.cfg.storage, entry=entry, poll_s=self.cfg.poll_s, **self.plan.model_dump()
        )
        before = self.runs.get(name, {})
        starts = before.get("starts", 0) + 1 if before.get("generation") == entry.generation else 1
        self.runs[name] = {"status": "queued", "run": entry.run_name, "queued_at": time.time(),
                           "generation": entry.generation, "starts": starts}  # fmt: skip
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
