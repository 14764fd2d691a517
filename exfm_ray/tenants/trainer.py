"""A Ray Train run hosting tenants: `build_tenant_trainer(...)` -> TorchTrainer running `train_loop`.

A run trains either one tenant on its own workers (data parallel when `workers` > 1) or a group of
small one-worker tenants on one worker: the marginal tenant then costs its student and optimizer,
not a Ray Train run of its own (controller, workers, each a Python process importing torch). The
tenant manager decides the grouping and may add members while the run is going (members.json);
every member walks the windows with its own `TenantRun`, one window per member per round.

Each run reads its tenants' rows of the augmented windows straight from the DAS's Parquet (one
Ray Dataset stream cannot feed several trainers), evaluates on window t before training on it,
then saves the tenant's state, metrics and published student (exfm_ray/tenants/outputs.py).

- Resume: every tenant resumes from its own state file, whichever run hosts it next; a worker
  killed mid-window is restarted by Ray Train (FailureConfig) and the window is trained again from
  the state, so its metrics are recorded once.
- Isolation: in a group, a member whose config or window fails is dropped (its progress says
  "failed" and why); the other members keep training.
- Continuous mode (`follow`): when no member's next window is committed, the run waits for the
  DAS; it stops at `last_window`, when no member is left, or when asked to yield its slot.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from pydantic import Field, model_validator

from exfm_ray.configbase import Config
from exfm_ray.errors import ExfmError
from exfm_ray.files import atomic_write
from exfm_ray.tenants.outputs import TenantFiles, is_active
from exfm_ray.tenants.registry import TenantEntry, TenantRegistry
from exfm_ray.train_runs import allreduce_mean_grads

# One-worker tenants one run hosts at most. Runs open first (up to max_concurrent), so the cap only
# decides when runs must take turns (max_concurrent x this many tenants): each turn costs a Ray
# Train start-up, while a bigger group costs nothing idle (~1.5 MB per size-1 student, measured).
TENANTS_PER_RUN = 32
# The young FM's wait (young_board.py); at most 900 s: the other ranks wait in a gloo broadcast (timeout 1800 s).
YOUNG_FM_WAIT_S, YOUNG_FM_WAIT_MAX_S = 120.0, 900.0


class WindowPlan(Config):
    """Which windows a training request covers: what the tenant manager hands every run it starts."""

    first_window: int = Field(0, ge=0, description="First window to train on (a resumed run starts after its last).")
    last_window: int | None = Field(None, ge=0, description="Last window to train on; None: follow the stream.")
    follow: bool = Field(False, description="Wait for windows the DAS has not committed yet instead of failing.")

    @model_validator(mode="after")
    def _bounded(self) -> WindowPlan:
        if self.last_window is None and not self.follow:
            raise ValueError("last_window is required unless follow is set")
        return self

    def covers(self, t: int) -> bool:
        return self.last_window is None or t <= self.last_window


class TenantRunConfig(Config):
    storage: str = Field(description="Storage root: augmented windows, tenant registry, published students.")
    lead: TenantEntry = Field(description="The tenant the run was opened for: its workers and resources size the run.")
    key: str = Field("", description="The run's key (`solo-<tenant>`, `group-<n>`); empty: solo-<lead>.")
    plan: WindowPlan = Field(description="The windows to train.")
    poll_s: float = Field(1.0, gt=0, description="How often a following run looks for a new window.")
    progress_every_s: float = Field(0.5, gt=0, description="How often rank 0 rewrites a tenant's progress.json.")
    yield_after: int = Field(4, ge=1, description="Rounds a run asked to give up its slot still trains when far "
                             "behind (caught up, it yields at once).")  # fmt: skip
    young_fm_wait_s: float = Field(YOUNG_FM_WAIT_S, ge=0, le=YOUNG_FM_WAIT_MAX_S, description="How long tenants "
                                   "judging the young FM wait for those other runs train towards its first labeled "
                                   "window.")  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _keyed(cls, data):
        if isinstance(data, dict) and not data.get("key") and data.get("lead") is not None:
            lead = data["lead"]
            name = lead.config.name if isinstance(lead, TenantEntry) else lead["config"]["name"]
            data = {**data, "key": f"solo-{name}"}
        return data


@dataclass
class _Member:
    entry: TenantEntry
    run: object  # TenantRun
    files: TenantFiles
    next: int
    loop: object = None  # StoreReader of the run's LoopFM store, for a LoopFM tenant

    def ready(self, committed) -> bool:
        """Window `next` is committed and, for LoopFM, so is the store version before it: the
        version its rows read, so that a resumed run reads what the first attempt read."""
        if self.next not in committed:
            return False
        if self.loop is None or self.next == 0:
            return True
        latest = self.loop.latest()
        return latest is not None and latest >= self.next - 1


class _Group:
    """The tenants one worker trains, kept in step with members.json and the registry."""

    def __init__(self, run_cfg: TenantRunConfig, registry: TenantRegistry, spec, rank: int, world: int):
        self.cfg, self.registry, self.spec = run_cfg, registry, spec
        self.rank, self.world = rank, world
        self.members: dict[str, _Member] = {}
        self.results: dict[str, dict] = {}
        self.failed: set[str] = set()  # run names that failed here: not taken again by this run
        self.dropped: dict[str, dict] = {}  # what the manager learns from registry.dropped(key)
        self.loop = None  # the run's LoopFM StoreReader, one for all members: a version is read once
        self.judge_later = False  # asked to yield while awaiting tenants that need the slot: settle_young

    def sync(self) -> None:
        entries = self.registry.entries()
        names = self._names()
        for name, m in list(self.members.items()):
            if name not in names or not is_active(entries, m.entry):  # removed, re-added or moved away
                self._drop(m, "finished")
        for entry in self._joining(entries, names):
            self._join(entry)

    def _joining(self, entries: dict[str, TenantEntry], names: list[str]) -> list[TenantEntry]:
        """The run's tenants to take now: active, not hosted yet, not failed in this run."""
        return [e for n in names if n not in self.members and (e := entries.get(n)) is not None
                and e.status == "active" and e.run_name not in self.failed]  # fmt: skip

    def fail_unless_one_fits(self) -> bool:
        """Before any worker starts: when no tenant to take resolves against the stream, fail each as
        `_join` would and return True; False as soon as one fits."""
        from exfm_ray.tenants.config import resolve

        unfit = []
        for entry in self._joining(self.registry.entries(), self._names()):
            try:
                resolve(entry.config, self.spec)
            except ExfmError as exc:
                unfit.append((entry, exc))
            else:
                return False
        for entry, exc in unfit:
            self._fail(entry, self._files(entry), exc, self.cfg.plan.first_window)
        return bool(unfit)

    def _files(self, entry: TenantEntry) -> TenantFiles:
        return TenantFiles(self.cfg.storage, entry, self.registry, self.rank, self.cfg.progress_every_s)

    def _names(self) -> list[str]:
        lead = self.cfg.lead.config.name
        if self.world > 1:
            return [lead]  # a data-parallel run hosts its tenant only
        try:
            return json.loads(self.registry.members_path(self.cfg.key).read_text())
        except FileNotFoundError:
            return [lead]

    def _join(self, entry: TenantEntry) -> None:
        from exfm_ray.tenants.config import resolve
        from exfm_ray.tenants.run import TenantRun

        files = self._files(entry)
        try:
            sync = allreduce_mean_grads if self.world > 1 else None
            view = resolve(entry.config, self.spec)
            loop = self._loop_store(entry.config) if entry.config.distill().loopfm else None
            run = TenantRun(view, rank=self.rank, world_size=self.world, grad_sync=sync,
                            fm_dim=loop.dim if loop is not None else 0)  # fmt: skip
            files.restore(run)
        except Exception as exc:
            if self.world > 1:
                raise
            self._fail(entry, files, exc, self.cfg.plan.first_window)
            return
        start = max(self.cfg.plan.first_window, run.last_window + 1)
        self.members[entry.config.name] = _Member(entry, run, files, start, loop)
        files.progress(len(run.history), start, "starting", 0, 0)  # training here now: other runs wait for its post

    def _loop_store(self, tenant):
        """The run's LoopFM store, which `exfm run` declares before any tenant starts."""
        from exfm_ray.loopfm.builder import check_readable, store_root
        from exfm_ray.loopfm.store import StoreReader

        if self.loop is None:
            self.loop = StoreReader.open(store_root(self.cfg.storage))
        if self.loop is None:
            raise ExfmError(
                f"tenant {tenant.name!r} uses variant {tenant.variant!r} but {store_root(self.cfg.storage)} holds "
                "no LoopFM store: `exfm run` builds it when a tenant of the run reads one"
            )
        check_readable(tenant.name, tenant.student.loopfm.store, self.loop.cfg)
        return self.loop

    def score(self, m: _Member, table):
        """Evaluate m on its next window (TenantRun.score); None if it failed (and was dropped)."""
        try:
            return m.run.score(m.next, table, m.loop.view(m.next) if m.loop is not None else None)
        except Exception as exc:
            self._lost(m, exc)
            return None

    def settle_young(self, pending: list) -> list:
        """Members scored on the FM's first labeled window post their evidence; each gets the verdict pooled
        over every post so far (young_board.py), rank 0's on every rank. Returns those still members."""
        from exfm_ray.students.young_fm import young_verdict
        from exfm_ray.tenants import young_board

        posted = []
        for m, s in pending:
            try:
                if self.rank == 0:
                    young_board.post(self.registry, m.entry.config.name, m.entry.run_name, m.next,
                                     m.run.learner.young_evidence)  # fmt: skip
                posted.append((m, s))
            except Exception as exc:
                self._lost(m, exc)
        later = False
        if posted and self.rank == 0:  # the other ranks wait in the broadcast; no member here moves meanwhile
            for m in self.members.values():
                m.files.progress(len(m.run.history), m.next, "pooling", 0, 0)
            window, asked_to_yield = max(m.next for m, _ in posted), self.registry.yield_path(self.cfg.key).exists
            hosted = {*self.members, *self._names()}  # and those the manager adds meanwhile: they join after the wait
            later = young_board.judge_later(self.registry, window, hosted, self.cfg.young_fm_wait_s, self.cfg.poll_s,
                                            self.cfg.plan.follow, asked_to_yield)  # fmt: skip
        evidence = young_board.pooled(self.registry, self.rank, self.world, later) if posted else {}
        if evidence is None:  # give up the slot, window untrained: judged when back, on the posts of those let in
            self.judge_later = True
            return []
        for m, s in posted:
            verdict = young_verdict(list(evidence.values()), m.run.learner.distill.fm_gate_young_z)
            m.run.settle_young(s, verdict, sorted(evidence))
        return posted

    def fit(self, m: _Member, scored) -> bool:
        """Train m on the window scored; False if it failed (and was dropped)."""
        t = m.next
        progress = lambda phase, i, n: m.files.progress(len(m.run.history), t, phase, i, n)  # noqa: E731
        try:
            record = m.run.fit(scored, progress)
        except Exception as exc:
            self._lost(m, exc)
            return False
        m.files.after_window(m.run, record)
        m.next += 1
        return True

    def _lost(self, m: _Member, exc: Exception) -> None:
        if self.world > 1:
            raise exc  # the other ranks are inside the same all-reduce: let Ray Train restart them
        del self.members[m.entry.config.name]
        self._fail(m.entry, m.files, exc, m.next)

    def _fail(self, entry: TenantEntry, files: TenantFiles, exc: Exception, window: int) -> None:
        from exfm_ray.observability import LOG

        error = f"{type(exc).__name__}: {exc}"[:500]
        LOG.error("tenant %s failed in run %s: %s", entry.config.name, self.cfg.key, error)
        self.failed.add(entry.run_name)
        files.progress(0, window, "failed", 0, 0, error=error)
        self._note_drop(entry, "failed", error)
        self.results[entry.config.name] = {"tenant": entry.config.name, "run": entry.run_name, "status": "failed",
                                           "error": error, "windows": []}  # fmt: skip

    def _note_drop(self, entry: TenantEntry, phase: str, error: str = "") -> None:
        if self.rank != 0:
            return
        drop = {"run": entry.run_name, "phase": phase, "error": error, "updated_at": time.time()}
        self.dropped[entry.config.name] = drop
        atomic_write(self.registry.dropped_path(self.cfg.key), json.dumps(self.dropped))

    def _drop(self, m: _Member, status: str) -> None:
        self.members.pop(m.entry.config.name, None)
        m.files.progress(len(m.run.history), m.run.last_window, "done", 0, 0)
        self._note_drop(m.entry, "done")
        self.results[m.entry.config.name] = {
            "tenant": m.entry.config.name, "run": m.entry.run_name, "status": status,
            "windows": [r["window"] for r in m.run.history], "last_window": m.run.last_window,
        }  # fmt: skip

    def finish(self) -> dict[str, dict]:
        for m in list(self.members.values()):
            self._drop(m, "finished")
        return self.results


def train_loop(config: dict) -> dict:
    """Runs on every worker of a run; rank 0 returns the run's summary, one entry per tenant."""
    import ray.train
    import torch

    from exfm_ray.das.store import AugmentedStore

    run_cfg = TenantRunConfig.model_validate(config["run"])
    plan = run_cfg.plan
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(run_cfg.lead.config.threads_per_worker)
    store = AugmentedStore(run_cfg.storage)
    registry = TenantRegistry(run_cfg.storage)
    started = time.time()
    group = _Group(run_cfg, registry, _wait_for_spec(store, run_cfg), rank, world)
    rounds = 0
    while True:
        group.sync()
        pending = [m for m in group.members.values() if plan.covers(m.next)]
        if not pending:
            break
        committed = store.records()
        ready = [m for m in pending if m.ready(committed)]
        # Its slot is wanted by a waiting run: give it up once caught up, or after a quantum of
        # rounds when far behind; the manager starts its tenants again when a window is left.
        if registry.yield_path(run_cfg.key).exists() and (not ready or rounds >= run_cfg.yield_after):
            break
        if not ready:
            if not plan.follow:
                waiting = ", ".join(f"{m.entry.config.name} (window {m.next})" for m in pending)
                raise ExfmError(f"not committed for {waiting}: the augmented window (run the DAS first) or, "
                                "for a LoopFM tenant, the store version before it (exfm run folds it)")  # fmt: skip
            for m in pending:
                m.files.progress(len(m.run.history), m.next, "waiting", 0, 0)
            time.sleep(run_cfg.poll_s)
            continue
        # the members awaiting the young FM's verdict train after every ready member has scored: it pools them
        pending = []
        for m in ready:
            scored = group.score(m, store.read_window(m.next, columns=m.run.view.columns))
            if scored is not None and m.run.learner.young_pending:
                pending.append((m, scored))
            elif scored is not None:
                group.fit(m, scored)
        for m, scored in group.settle_young(pending):
            group.fit(m, scored)
        if group.judge_later:
            break
        rounds += 1
    return {"run": run_cfg.key, "tenants": group.finish(), "seconds": round(time.time() - started, 2)}


def _wait_for_spec(store, run_cfg: TenantRunConfig):
    while True:
        spec = store.spec()
        if spec is not None:
            return spec
        if not run_cfg.plan.follow:
            raise ExfmError(f"no augmented windows in {store.root}: run the DAS first")
        time.sleep(run_cfg.poll_s)


def build_tenant_trainer(run_cfg: TenantRunConfig):
    """The TorchTrainer of one run: its own workers and resources, sized by its lead tenant."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from exfm_ray.train_runs import torch_trainer

    cfg = run_cfg.lead.config
    registry = TenantRegistry(run_cfg.storage)
    return torch_trainer(
        train_loop,
        train_loop_config={"run": run_cfg.model_dump(mode="json")},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker},
        ),
        run_config=RunConfig(
            name=run_cfg.key,
            storage_path=str((registry.run_dir(run_cfg.key) / "ray-train").resolve()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def fit_tenant(run_cfg: TenantRunConfig) -> dict:
    """Train the run's tenants to the end of its windows (blocking); returns the run's summary."""
    refused = refuse_unresolvable(run_cfg)
    if refused is not None:
        return refused
    result = build_tenant_trainer(run_cfg).fit()
    if result.error is not None:
        raise result.error
    return result.return_value


def refuse_unresolvable(run_cfg: TenantRunConfig) -> dict | None:
    """A run none of whose tenants fits the stream (rows naming no stream tenant, unknown features) fails
    here, as its worker would, before any Ray Train process starts: a config error costs no gang
    (a run's controller, helper actors and first worker take ~30 CPU-seconds before the first batch,
    measured, stop 28). None: launch (a member fits, or nothing is committed yet to check against)."""
    from exfm_ray.das.store import AugmentedStore

    spec = AugmentedStore(run_cfg.storage).spec()
    if spec is None:
        return None
    group = _Group(run_cfg, TenantRegistry(run_cfg.storage), spec, rank=0, world=run_cfg.lead.config.workers)
    return {"run": run_cfg.key, "tenants": group.results, "seconds": 0.0} if group.fail_unless_one_fits() else None
