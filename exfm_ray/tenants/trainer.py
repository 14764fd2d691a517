"""A tenant's Ray Train run: `build_tenant_trainer(...)` -> TorchTrainer running `train_loop`.

Each run reads its tenant's rows of the augmented windows straight from the DAS's Parquet (one
Ray Dataset stream cannot feed several trainers), evaluates on window t before training on it,
and after each window reports its metrics with a checkpoint, then publishes the serving path.

- Resume: the run's name is fixed per tenant (and generation), so Ray Train finds the latest
  checkpoint of an earlier or crashed run of it; `ray.train.get_checkpoint()` restores the
  student, optimizers and history, and the run continues with the next window. A worker killed
  mid-window restarts the window from the last checkpoint, so its metrics are reported once.
- Continuous mode (`follow`): when the next window is not committed yet, the run waits for the
  DAS and picks it up; it stops at `last_window`, or when the tenant is removed.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

from pydantic import Field, model_validator

from exfm_ray.configbase import Config
from exfm_ray.errors import ExfmError
from exfm_ray.numbers import finite
from exfm_ray.tenants.registry import TenantEntry, TenantRegistry

STATE_FILE = "state.pt"


class WindowPlan(Config):
    """Which windows a training request covers: what the tenant manager hands every run it starts."""

    first_window: int = Field(0, ge=0, description="First window to train on (a resumed run starts after its last).")
    last_window: int | None = Field(None, ge=0, description="Last window to train on; None: follow the stream.")
    follow: bool = Field(False, description="Wait for windows the DAS has not committed yet instead of failing.")


class TenantRunConfig(Config):
    storage: str = Field(description="Storage root: augmented windows, tenant registry, published students.")
    entry: TenantEntry = Field(description="The tenant's registry entry (config and generation).")
    first_window: int = Field(0, ge=0, description="First window to train on (a resumed run starts after its last).")
    last_window: int | None = Field(None, ge=0, description="Last window to train on; None: follow the stream.")
    follow: bool = Field(False, description="Wait for windows the DAS has not committed yet instead of failing.")
    poll_s: float = Field(1.0, gt=0, description="How often a following run looks for a new window.")
    progress_every_s: float = Field(0.5, gt=0, description="How often rank 0 rewrites progress.json.")
    yield_after: int = Field(4, ge=1, description="Windows a run asked to give up its slot still trains when far "
                             "behind (caught up, it yields at once).")  # fmt: skip

    @model_validator(mode="after")
    def _bounded(self) -> TenantRunConfig:
        if self.last_window is None and not self.follow:
            raise ValueError("last_window is required unless follow is set")
        return self


def version_name(entry: TenantEntry, window: int) -> str:
    return f"g{entry.generation}-w{window:04d}"


def train_loop(config: dict) -> dict:
    """Runs on every worker of a tenant's TorchTrainer; rank 0 returns the run's summary."""
    import ray.train
    import torch

    from exfm_ray.das.store import AugmentedStore
    from exfm_ray.tenants.config import resolve
    from exfm_ray.tenants.run import TenantRun

    run_cfg = TenantRunConfig.model_validate(config["run"])
    entry, cfg = run_cfg.entry, run_cfg.entry.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    store = AugmentedStore(run_cfg.storage)
    registry = TenantRegistry(run_cfg.storage)
    files = _TenantFiles(run_cfg, registry, rank)
    spec = _wait_for_spec(store, run_cfg, files)
    run = TenantRun(resolve(cfg, spec), rank=rank, world_size=world, grad_sync=_allreduce_mean if world > 1 else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run.load_state_dict(torch.load(Path(folder) / STATE_FILE, weights_only=True))
        files.after_restore(run)
    t = max(run_cfg.first_window, run.last_window + 1)
    started = time.time()
    trained_here = 0
    while run_cfg.last_window is None or t <= run_cfg.last_window:
        if not _active(registry, entry):
            break
        committed = t in store.records()
        # Its slot is wanted by a waiting tenant: give it up once caught up, or after a quantum of
        # windows when far behind; the manager starts it again when a window is left for it.
        if registry.yield_path(cfg.name).exists() and (not committed or trained_here >= run_cfg.yield_after):
            break
        if not committed:
            if not run_cfg.follow:
                raise ExfmError(f"tenant {cfg.name}: augmented window {t} is not committed; run the DAS first")
            files.progress(len(run.history), t, "waiting", 0, 0)
            time.sleep(run_cfg.poll_s)
            continue
        table = store.read_window(t, columns=run.view.columns)
        record = run.window(t, table, lambda phase, i, n, t=t: files.progress(len(run.history), t, phase, i, n))
        metrics = {k: v for k, v in record.items() if isinstance(v, int | float) and math.isfinite(v)}
        _report(metrics, run.state_dict() if rank == 0 else None)
        files.after_window(run, record)
        t += 1
        trained_here += 1
    files.progress(len(run.history), run.last_window, "done", 0, 0)
    return {
        "tenant": cfg.name,
        "run": entry.run_name,
        "windows": [r["window"] for r in run.history],
        "last_window": run.last_window,
        "seconds": round(time.time() - started, 2),
    }


def _report(metrics: dict, state: dict | None) -> None:
    """Report the window with its checkpoint, uploaded in the background.

    A synchronous report blocks until the controller has taken the previous one, and it polls
    every 2 s: with windows shorter than that, training would wait on it (measured: the Ray run
    at half the rows/s of the plain loop). The upload thread reports in order; a crash before it
    finishes costs one window of recomputation, and the history stays exactly-once because it is
    part of the checkpoint."""
    import ray.train
    import torch
    from ray.train import CheckpointUploadMode

    checkpoint = None
    if state is not None:
        folder = Path(tempfile.mkdtemp(prefix="exfm-tenant-ckpt-"))
        torch.save(state, folder / STATE_FILE)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    ray.train.report(
        metrics,
        checkpoint=checkpoint,
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
        delete_local_checkpoint_after_upload=True,
    )


class _TenantFiles:
    """What rank 0 leaves for people and serving: progress, per-window metrics, published students."""

    def __init__(self, run_cfg: TenantRunConfig, registry: TenantRegistry, rank: int):
        self.cfg = run_cfg
        self.registry = registry
        self.rank = rank
        self.name = run_cfg.entry.config.name
        self._last_progress = 0.0
        self._last_key: tuple | None = None

    def progress(self, windows_done: int, window: int, phase: str, done: int, total: int) -> None:
        now = time.time()
        # A following run polls often: rewrite an unchanged "waiting" only now and then.
        repeat = phase == "waiting" and self._last_key == (phase, window)
        partial = phase == "train" and 0 < done < total
        if self.rank != 0 or ((repeat or partial) and now - self._last_progress < self.cfg.progress_every_s):
            return
        self._last_progress, self._last_key = now, (phase, window)
        import json

        from exfm_ray.files import atomic_write

        atomic_write(
            self.registry.progress_path(self.name),
            json.dumps({"run": self.cfg.entry.run_name, "window": window, "phase": phase, "batch": done,
                        "batches": total, "windows_done": windows_done, "pid": os.getpid(), "updated_at": now}),
        )  # fmt: skip

    def after_window(self, run, record: dict) -> None:
        from exfm_ray.observability import LOG, gauge

        if self.rank != 0:
            return
        self._write_metrics(run)
        # A tenant removed while this window trained is no longer served: do not publish it again.
        published = self._publish(run) if _active(self.registry, self.cfg.entry) else None
        tags = {"tenant": self.name}
        for key in ("ne", "auc", "calibration", "control_ne", "fm_ne", "served_ne", "rows_per_s"):
            value = record.get(key)
            if isinstance(value, float) and math.isfinite(value):
                gauge(f"tenant_{key}", f"Tenant student {key} on its latest window", ("tenant",)).set(value, tags)
        LOG.info(summary_line(self.name, record, published))

    def after_restore(self, run) -> None:
        """A crash may have come between the checkpoint and these files: bring them up to date."""
        if self.rank == 0 and run.history:
            self._write_metrics(run)
            self._publish(run)

    def _write_metrics(self, run) -> None:
        import json

        from exfm_ray.files import atomic_write, json_safe

        atomic_write(self.registry.metrics_path(self.name), json.dumps(json_safe(run.history), indent=1))

    def _publish(self, run) -> str | None:
        from exfm_ray.students.checkpoint import student_meta
        from exfm_ray.students.store import StudentStore

        store = StudentStore(self.cfg.storage)
        version = version_name(self.cfg.entry, run.last_window)
        latest = store.latest(self.name)
        if latest is not None and latest.version == version:
            return version
        if not run.healthy():
            return None
        last = run.history[-1]
        cfg = self.cfg.entry.config
        meta = student_meta(
            run.view.spec,
            self.name,
            cfg.student,
            version=version,
            window=run.last_window,
            fm_versions=sorted(run.fm_versions),
            metrics={
                k: last.get(k)
                for k in ("ne", "auc", "calibration", "loss", "control_ne", "base_rate_ne", "served_ne")
                if finite(last.get(k))
            },
            variant=cfg.variant,
            served=run.served_choice,
            guard_reason=last.get("guard_reason", ""),
        )
        store.publish(run.served_model(), meta)
        return version


def summary_line(tenant: str, r: dict, published: str | None) -> str:
    def f(key: str) -> str:
        v = r.get(key)
        return f"{v:.4f}" if finite(v) else "-"

    return (
        f"tenant {tenant} window {r['window']}: NE {f('ne')} (alone {f('control_ne')}, FM {f('fm_ne')}), "
        f"AUC {f('auc')}, {r['rows']} rows, {r.get('rows_per_s', 0):,.0f} rows/s, "
        f"published {published or 'nothing'} ({r.get('guard_choice', 'exfm')}: {r.get('guard_reason', '')})"
    )


def _active(registry: TenantRegistry, entry: TenantEntry) -> bool:
    now = registry.entries().get(entry.config.name)
    return now is not None and now.status == "active" and now.generation == entry.generation


def _wait_for_spec(store, run_cfg: TenantRunConfig, files: _TenantFiles):
    while True:
        spec = store.spec()
        if spec is not None:
            return spec
        if not run_cfg.follow:
            raise ExfmError(f"no augmented windows in {store.root}: run the DAS first")
        files.progress(0, run_cfg.first_window, "waiting", 0, 0)
        time.sleep(run_cfg.poll_s)


def _allreduce_mean(params: list) -> None:
    """Average gradients over the run's workers (data parallel), as one flat all-reduce."""
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def build_tenant_trainer(run_cfg: TenantRunConfig):
    """The TorchTrainer of one tenant: its own workers and resources, a fixed run name to resume by."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    entry, cfg = run_cfg.entry, run_cfg.entry.config
    registry = TenantRegistry(run_cfg.storage)
    return TorchTrainer(
        train_loop,
        train_loop_config={"run": run_cfg.model_dump(mode="json")},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker},
        ),
        run_config=RunConfig(
            name=entry.run_name,
            storage_path=str(registry.train_storage(cfg.name).resolve()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def fit_tenant(run_cfg: TenantRunConfig) -> dict:
    """Train one tenant to the end of its windows (blocking); returns the run's summary."""
    result = build_tenant_trainer(run_cfg).fit()
    if result.error is not None:
        raise result.error
    return result.return_value
