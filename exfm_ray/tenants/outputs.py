"""What a tenant's training leaves on shared storage, written by rank 0 of the run that hosts it:

    <storage>/tenants/<name>/progress.json  what it is doing now (window, phase, batch, pid; error)
    <storage>/tenants/<name>/metrics.json   per-window metrics, as of its state file
    <storage>/tenants/<name>/state.pt       its resume point: student, optimizers, history
    <storage>/students/<name>/...           published serving students (StudentStore)

Why the resume point is the tenant's own file and not its Ray Train run's checkpoint: a run may
host several tenants and the tenants a run hosts change (added, removed, regrouped after a run
yields its slot), so whatever run trains a tenant next, alone or in a group, picks it up from
here. The state file is written before metrics and publishing: a crash between them is repaired
by `after_restore`, and the history stays exactly-once because it is part of the state.
"""

from __future__ import annotations

import io
import json
import math
import os
import time

from exfm_ray.files import atomic_write, json_safe
from exfm_ray.numbers import finite
from exfm_ray.tenants.registry import TenantEntry, TenantRegistry

STATE_FILE = "state.pt"
_METRIC_KEYS = ("ne", "auc", "calibration", "loss", "control_ne", "blend_ne", "base_rate_ne", "served_ne")


def version_name(entry: TenantEntry, window: int) -> str:
    return f"g{entry.generation}-w{window:04d}"


def is_active(entries: dict[str, TenantEntry], entry: TenantEntry) -> bool:
    """The entry is still the tenant's current, active registration (not removed, not re-added);
    `entries`: the registry's, as read once by the caller."""
    now = entries.get(entry.config.name)
    return now is not None and now.status == "active" and now.generation == entry.generation


def announce(
    storage: str, registry: TenantRegistry, entry: TenantEntry, window: int, phase: str, error: str = ""
) -> None:
    """The tenant's progress while no run's worker writes it, by the tenant manager: "queued" for a slot, "starting"
    once its run holds one (before the workers start), "failed" with the run. The young FM's board waits only for
    tenants in training (young_board.py)."""
    windows_done = len(registry.history(entry.config.name))
    TenantFiles(storage, entry, registry, rank=0).progress(windows_done, window, phase, 0, 0, error)


class TenantFiles:
    """One tenant's files, as the run hosting it writes them (only rank 0 writes)."""

    def __init__(self, storage: str, entry: TenantEntry, registry: TenantRegistry, rank: int,
                 progress_every_s: float = 0.5):  # fmt: skip
        self.storage = storage
        self.entry = entry
        self.registry = registry
        self.rank = rank
        self.name = entry.config.name
        self.progress_every_s = progress_every_s
        self.state_path = registry.tenant_dir(self.name) / STATE_FILE
        self._last_progress = 0.0
        self._last_key: tuple | None = None

    def progress(self, windows_done: int, window: int, phase: str, done: int, total: int, error: str = "") -> None:
        now = time.time()
        # A following run polls often: rewrite an unchanged "waiting" only now and then.
        repeat = phase == "waiting" and self._last_key == (phase, window)
        partial = phase == "train" and 0 < done < total
        if self.rank != 0 or ((repeat or partial) and now - self._last_progress < self.progress_every_s):
            return
        self._last_progress, self._last_key = now, (phase, window)
        record = {"run": self.entry.run_name, "window": window, "phase": phase, "batch": done, "batches": total,
                  "windows_done": windows_done, "pid": os.getpid(), "updated_at": now}  # fmt: skip
        if error:
            record["error"] = error
        atomic_write(self.registry.progress_path(self.name), json.dumps(record))

    def restore(self, run) -> bool:
        """Load the tenant's resume point into `run` if one exists for this generation."""
        import torch

        try:
            saved = torch.load(self.state_path, weights_only=True)
        except FileNotFoundError:
            return False
        if saved.get("run") != self.entry.run_name:  # an earlier generation's student: start afresh
            return False
        run.load_state_dict(saved["state"])
        if self.rank == 0 and run.history:  # a crash may have come between the state and these files
            self._write_metrics(run)
            self._publish(run)
        return True

    def after_window(self, run, record: dict) -> None:
        from exfm_ray.observability import LOG, gauge

        if self.rank != 0:
            return
        self._save_state(run)
        self._write_metrics(run)
        # A tenant removed while this window trained is no longer served: do not publish it again.
        published = self._publish(run) if is_active(self.registry.entries(), self.entry) else None
        tags = {"tenant": self.name}
        for key in ("ne", "auc", "calibration", "control_ne", "fm_ne", "served_ne", "rows_per_s"):
            value = record.get(key)
            if isinstance(value, float) and math.isfinite(value):
                gauge(f"tenant_{key}", f"Tenant student {key} on its latest window", ("tenant",)).set(value, tags)
        LOG.info(summary_line(self.name, record, published))

    def _save_state(self, run) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save({"run": self.entry.run_name, "state": run.state_dict()}, buffer)
        tmp = self.state_path.with_name(f".{STATE_FILE}.{os.getpid()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, self.state_path)  # readers (a restarted worker) see the old state or the new

    def _write_metrics(self, run) -> None:
        atomic_write(self.registry.metrics_path(self.name), json.dumps(json_safe(run.history), indent=1))

    def _publish(self, run) -> str | None:
        from exfm_ray.students.meta import student_meta
        from exfm_ray.students.store import StudentStore

        store = StudentStore(self.storage)
        version = version_name(self.entry, run.last_window)
        latest = store.latest(self.name)
        if latest is not None and latest.version == version:
            return version
        if not run.healthy():
            return None
        last = run.history[-1]
        cfg = self.entry.config
        meta = student_meta(
            run.view.spec,
            self.name,
            cfg.student,
            version=version,
            window=run.last_window,
            fm_versions=sorted(run.fm_versions),
            metrics={k: last.get(k) for k in _METRIC_KEYS if finite(last.get(k))},
            variant=cfg.variant,
            served=run.served_choice,
            guard_reason=last.get("guard_reason", ""),
            store_version=last.get("store_version"),
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
