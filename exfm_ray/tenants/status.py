"""What a person watching tenants sees: one row per registered tenant, one progress bar per run."""

from __future__ import annotations

import time
from pathlib import Path

from exfm_ray.students.store import StudentStore
from exfm_ray.tenants.registry import TenantRegistry


def tenant_rows(storage: Path) -> list[dict]:
    registry, store = TenantRegistry(storage), StudentStore(storage)
    out = []
    for name, entry in sorted(registry.entries().items()):
        history = registry.history(name)
        progress = registry.progress(name)
        pub = store.latest(name)
        last = history[-1] if history else {}
        out.append(
            {
                "tenant": name,
                "status": entry.status,
                "run": entry.run_name,
                "rows_from": entry.config.rows or [name],
                "variant": entry.config.variant,
                "student_size": entry.config.student.size,
                "workers": entry.config.workers,
                "windows_trained": len(history),
                "last_window": last.get("window"),
                "last_ne": last.get("ne"),
                "last_auc": last.get("auc"),
                "served_version": pub.version if pub else None,
                "guard": entry.config.guard,
                "serving": last.get("guard_choice"),
                "guard_reason": last.get("guard_reason"),
                "last_control_ne": last.get("control_ne"),
                "phase": progress.get("phase"),
                "progress_age_s": round(time.time() - progress["updated_at"], 1) if progress else None,
            }
        )
    return out


class TenantBars:
    """One tqdm bar per tenant, in windows, fed from the tenants' progress and metrics files."""

    def __init__(self, storage, first: int, last: int | None, enabled: bool = True):
        self.registry = TenantRegistry(storage)
        self.first, self.last = first, last
        self.enabled = enabled
        self.bars: dict = {}

    def update(self, status: dict) -> None:
        from tqdm import tqdm

        if not self.enabled:
            return
        for name, run in status["runs"].items():
            if name not in self.bars:
                total = None if self.last is None else self.last - self.first + 1
                self.bars[name] = tqdm(total=total, desc=f"{name:<12}", unit="window", position=len(self.bars))
            bar = self.bars[name]
            history = self.registry.history(name)
            done = sum(1 for r in history if r["window"] >= self.first)
            bar.update(done - bar.n)
            progress = self.registry.progress(name)
            last = history[-1] if history else {}
            ne = f"NE {last['ne']:.4f}" if isinstance(last.get("ne"), float) else ""
            phase = run["status"] if run["status"] != "running" else progress.get("phase", "starting")
            bar.set_postfix_str(f"{phase} {ne}".strip(), refresh=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
