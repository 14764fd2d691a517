"""The tenant manager: runs every registered tenant's training in Ray Train runs, several at once,
and takes new tenants while it runs.

A plain class (actors/launch.py makes it a named async actor). Each run's TorchTrainer.fit() waits
in a thread of the manager (not a Ray task of its own: that was one more Python process importing
torch, ~500 MB, per run); the run's controller and workers are actors of their own, so a slow or
failing run holds only its own workers. At most `max_concurrent` runs hold resources at a time, the
rest queue.

Cheap tenants: a tenant of one worker does not need a Ray Train run of its own. While fewer than
`max_concurrent` runs exist a new tenant opens one (parallelism first); after that it joins the
smallest run of its shape (same CPUs, threads, resources) holding fewer than `tenants_per_run`
tenants, even one that is already training (members.json: the run takes it at its next round).
A data-parallel tenant (`workers` > 1) always has its own run, and so does one with `own_run` (a
big or slow tenant: a shared run trains its members' windows one after another).

No starvation when following the stream: a following run never ends by itself, so while a run
waits for a slot the manager asks the run that has held one longest to yield after its current
round (a file in the run's folder). Its tenants are placed again as soon as a window they have not
trained is committed; each resumes from its own state file. Every tenant therefore trains every
committed window within a bounded number of rounds of its commit, however many tenants there are.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.das.store import AugmentedStore
from exfm_ray.errors import ConfigError
from exfm_ray.files import atomic_write
from exfm_ray.observability import LOG
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.outputs import announce
from exfm_ray.tenants.registry import TenantEntry, TenantRegistry
from exfm_ray.tenants.trainer import (
    TENANTS_PER_RUN,
    YOUNG_FM_WAIT_MAX_S,
    YOUNG_FM_WAIT_S,
    TenantRunConfig,
    WindowPlan,
    fit_tenant,
)


class TenantManagerConfig(Config):
    name: str = Field("exfm-tenants", description="Ray actor name (`exfm tenants add` finds the manager by it).")
    namespace: str = Field("exfm", description="Ray namespace of the manager.")
    storage: str = Field(description="Storage root: augmented windows, tenant registry, published students.")
    max_concurrent: int = Field(4, ge=1, description="Ray Train runs holding resources at the same time.")
    tenants_per_run: int = Field(TENANTS_PER_RUN, ge=1, description="One-worker tenants one run hosts at "
                                 "most (1: every tenant its own run).")  # fmt: skip
    poll_s: float = Field(1.0, gt=0, description="How often a following run looks for the next window.")
    young_fm_wait_s: float = Field(YOUNG_FM_WAIT_S, ge=0, le=YOUNG_FM_WAIT_MAX_S, description="How long a tenant "
                                   "judging the young FM waits for tenants other runs train towards that window to "
                                   "post.")  # fmt: skip


@dataclass
class _Launch:
    """One Ray Train run the manager started (or queued) and the tenants it hosts."""

    key: str
    shape: tuple
    shared: bool
    members: list[str] = field(default_factory=list)
    status: str = "queued"  # queued -> running -> ended
    started_at: float = 0.0
    yield_requested: bool = False
    task: asyncio.Task | None = None


class TenantManager:
    def __init__(self, cfg: TenantManagerConfig):
        self.cfg = cfg
        self.registry = TenantRegistry(cfg.storage)
        self.slots = asyncio.Semaphore(cfg.max_concurrent)
        self.fits = ThreadPoolExecutor(cfg.max_concurrent, thread_name_prefix="tenant-run")
        self.plan: WindowPlan | None = None  # the windows of the current train() call
        self.runs: dict[str, dict] = {}  # per tenant: status, its launch ("group"), times, errors
        self.launches: dict[str, _Launch] = {}
        self._seq = 0
        self._stopping = False

    async def train(self, first_window: int, last_window: int | None, follow: bool = False) -> dict:
        """Train every active tenant over the windows (and any tenant added meanwhile); returns
        when all runs have ended (following an unbounded stream: never), one summary per tenant."""
        self.plan = WindowPlan(first_window=first_window, last_window=last_window, follow=follow)
        try:
            # Data-parallel tenants first: each needs a run of its own, the small ones can share.
            for entry in sorted(self.registry.active(), key=lambda e: e.config.workers == 1 and not e.config.own_run):
                self._place_unless_done(entry)
            while not self._stopping:
                self._place_behind()
                if follow:
                    self._make_room()
                self._refresh()
                live = [la.task for la in self.launches.values() if la.task is not None and not la.task.done()]
                if not live and (not follow or self._all_through()):
                    break
                if live:
                    await asyncio.wait(live, timeout=self.cfg.poll_s, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(self.cfg.poll_s)
        finally:
            self.plan = None
        return self.status()

    async def add(self, cfg: dict, replace: bool = False) -> dict:
        """Register a tenant (validated against the stream) and, while training, place it in a run."""
        tenant = TenantConfig.parse(cfg, source="tenant config")
        spec = AugmentedStore(self.cfg.storage).spec()
        if spec is not None:
            resolve(tenant, spec)
        if replace and self._launch_of(tenant.name) is not None:
            raise ConfigError(f"tenant {tenant.name!r} is training; remove it and add it again")
        entry = self.registry.add(tenant, replace=replace)
        if self.plan is not None:
            self._place_unless_done(entry)
        return entry.model_dump(mode="json")

    async def stop(self, timeout_s: float = 120.0) -> dict:
        """Ask every run to end after its round and wait for them, so that their workers and placement
        groups are released now (a killed manager leaves that to Ray Train's cleaner: minutes here)."""
        self._stopping = True
        for launch in self.launches.values():
            self._ask_to_yield(launch)
        tasks = [la.task for la in self.launches.values() if la.task is not None and not la.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        return self.status()

    async def remove(self, name: str) -> dict:
        """Mark removed: its run drops it after the window in progress."""
        return self.registry.remove(name).model_dump(mode="json")

    def status(self) -> dict:
        plan = self.plan.model_dump() if self.plan is not None else None
        groups = {k: {"members": list(la.members), "status": la.status} for k, la in self.launches.items()}
        return {"training": self.plan is not None, "plan": plan, "runs": dict(self.runs), "groups": groups}

    def _launch_of(self, name: str) -> _Launch | None:
        return next((la for la in self.launches.values() if name in la.members), None)

    def _place(self, entry: TenantEntry) -> None:
        """Put the tenant in a run: a new one while there is room for runs, else the smallest of its shape."""
        assert self.plan is not None
        if self._stopping:
            return
        name, cfg = entry.config.name, entry.config
        now = time.time()
        home = self._launch_of(name)
        moved = home is None
        if home is None:
            shape = (cfg.cpus_per_worker, cfg.threads_per_worker, tuple(sorted(cfg.resources_per_worker.items())),
                     cfg.max_failures)  # fmt: skip
            shared = cfg.workers == 1 and not cfg.own_run and self.cfg.tenants_per_run > 1
            room = [la for la in self.launches.values() if la.shared and la.shape == shape and not la.yield_requested
                    and len(la.members) < self.cfg.tenants_per_run]  # fmt: skip
            if shared and room and len(self.launches) >= self.cfg.max_concurrent:
                home = min(room, key=lambda la: len(la.members))
            else:
                home = self._open(entry, shape, shared)
            home.members.append(name)
            atomic_write(self.registry.members_path(home.key), json.dumps(home.members))
        before = self.runs.get(name, {})
        starts = before.get("starts", 0) if before.get("generation") == entry.generation else 0
        starts += moved or not starts  # a new run for it, or a new generation in the same run
        self.runs[name] = {"status": "running" if home.status == "running" else "queued", "run": entry.run_name,
                           "group": home.key, "queued_at": now, "generation": entry.generation, "starts": starts,
                           **({"started_at": home.started_at} if home.status == "running" else {})}  # fmt: skip
        if moved and home.status == "queued":  # a run's worker writes its progress once it holds a slot
            self._announce([name], "queued")

    def _open(self, entry: TenantEntry, shape: tuple, shared: bool) -> _Launch:
        self._seq += 1
        key = f"group-{self._seq}" if shared else f"solo-{entry.config.name}"
        shutil.rmtree(self.registry.run_dir(key), ignore_errors=True)  # a request meant for an earlier run
        launch = _Launch(key=key, shape=shape, shared=shared)
        run_cfg = TenantRunConfig(storage=self.cfg.storage, lead=entry, key=key, plan=self.plan, poll_s=self.cfg.poll_s,
                                  young_fm_wait_s=self.cfg.young_fm_wait_s)  # fmt: skip
        self.launches[key] = launch
        launch.task = asyncio.get_running_loop().create_task(self._run(launch, run_cfg))
        return launch

    async def _run(self, launch: _Launch, run_cfg: TenantRunConfig) -> None:
        result = None
        async with self.slots:
            if self._stopping:  # stopped while it queued: never started
                run_cfg = None
            launch.status, launch.started_at = "running", time.time()
            for name in self._hosted(launch):
                self.runs[name].update(status="running", started_at=launch.started_at)
            try:
                if run_cfg is not None:
                    self._announce(self._hosted(launch), "starting")
                    result = await asyncio.get_running_loop().run_in_executor(self.fits, fit_tenant, run_cfg)
            except Exception as exc:  # one run's failure is its own; the other runs keep training
                error = _message(exc)
                LOG.error("tenant run %s failed: %s", launch.key, error)
                for name in self._hosted(launch):
                    self.runs[name].update(status="failed", error=error, ended_at=time.time())
                self._announce(self._hosted(launch), "failed", error)
        launch.status = "ended"
        done = (result or {}).get("tenants", {})
        for name in self._hosted(launch):
            state = self.runs[name]
            r = done.get(name)
            if r is not None and r["run"] == state["run"]:
                state.update(status=r["status"], result=r, ended_at=time.time(), **({"error": r["error"]}
                             if r.get("error") else {}))  # fmt: skip
            elif state["status"] in ("queued", "running"):  # joined after the run's last round
                state.update(status="finished", ended_at=time.time())
        del self.launches[launch.key]
        shutil.rmtree(self.registry.run_dir(launch.key), ignore_errors=True)

    def _announce(self, names: list[str], phase: str, error: str = "") -> None:
        """The tenants' progress while no worker of a run writes there: "queued" for a slot, "starting" once their
        run holds one (before its workers start), "failed" with it. The young FM's board waits only for tenants
        in training (young_board.py)."""
        entries = self.registry.entries()
        for name in names:
            entry = entries.get(name)
            if entry is None or entry.status != "active" or entry.run_name != self.runs.get(name, {}).get("run"):
                continue
            try:
                announce(self.cfg.storage, self.registry, entry, self._next_window(name), phase, error)
            except Exception as exc:  # a progress line must not cost the run
                LOG.warning("tenant %s: progress not written: %s", name, _message(exc))

    def _hosted(self, launch: _Launch) -> list[str]:
        return [n for n in launch.members if self.runs.get(n, {}).get("group") == launch.key]

    def _refresh(self) -> None:
        """A running run reports the members it dropped (failed or removed) in one file per run."""
        for launch in self.launches.values():
            if launch.status != "running":
                continue
            hosted = set(self._hosted(launch))
            for name, drop in self.registry.dropped(launch.key).items():
                state = self.runs.get(name)
                if name not in hosted or state is None or state["status"] != "running":
                    continue
                if drop["run"] != state["run"] or drop["updated_at"] < launch.started_at:
                    continue
                if drop["phase"] == "failed":
                    state.update(status="failed", error=drop["error"], ended_at=drop["updated_at"])
                elif drop["phase"] == "done":
                    state.update(status="finished", ended_at=drop["updated_at"])

    def _failed(self, entry: TenantEntry) -> bool:
        state = self.runs.get(entry.config.name, {})
        return state.get("status") == "failed" and state.get("generation") == entry.generation

    def _place_unless_done(self, entry: TenantEntry) -> None:
        """Place the tenant, unless this generation's run ended (`done`: after its last window was
        published) past the plan's last window: a run would start workers for nothing (a rerun). Not
        the metrics history: it outlives a generation, and a crash between the metrics and the publish
        leaves a window to republish (the run's restore does it)."""
        assert self.plan is not None
        p = self.registry.progress(entry.config.name)
        if p.get("phase") == "done" and p.get("run") == entry.run_name and not self.plan.covers(p["window"] + 1):
            self.runs[entry.config.name] = {"status": "finished", "run": entry.run_name, "starts": 0,
                                            "generation": entry.generation, "ended_at": time.time()}  # fmt: skip
        else:
            self._place(entry)

    def _next_window(self, name: str) -> int:
        assert self.plan is not None
        history = self.registry.history(name)
        return max(self.plan.first_window, history[-1]["window"] + 1) if history else self.plan.first_window

    def _place_behind(self) -> None:
        """Place every tenant outside a run that has a committed window left to train.
        (It failed on this config: `exfm tenants add --replace` gives it another try.)"""
        assert self.plan is not None
        unplaced = [e for e in self.registry.active() if self._launch_of(e.config.name) is None and not self._failed(e)]
        if not unplaced:
            return
        committed = set(AugmentedStore(self.cfg.storage).records())
        for entry in unplaced:
            t = self._next_window(entry.config.name)
            if t in committed and self.plan.covers(t):
                self._place(entry)

    def _make_room(self) -> None:
        """For each run waiting for a slot, ask the run that has held one longest to yield."""
        waiting = sum(1 for la in self.launches.values() if la.status == "queued")
        asked = sum(1 for la in self.launches.values() if la.status == "running" and la.yield_requested)
        running = sorted((la.started_at, la.key) for la in self.launches.values()
                         if la.status == "running" and not la.yield_requested)  # fmt: skip
        for _, key in running[: max(0, waiting - asked)]:
            self._ask_to_yield(self.launches[key])

    def _ask_to_yield(self, launch: _Launch) -> None:
        path = self.registry.yield_path(launch.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        launch.yield_requested = True

    def _all_through(self) -> bool:
        """Every active tenant trained through the plan's last window or failed on its current config."""
        assert self.plan is not None
        if self.plan.last_window is None:
            return False
        return all(self._failed(e) or not self.plan.covers(self._next_window(e.config.name))
                   for e in self.registry.active())  # fmt: skip


def _message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return f"{type(cause or exc).__name__}: {cause or exc}"[:500]
