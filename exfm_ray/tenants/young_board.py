"""Where the tenants of `exfm run` pool their evidence on the young FM (students/young_fm.py).

Each tenant's trainer, on the FM's first labeled window, posts what its student and the FM scored there
(`<storage>/tenants/<name>/young_fm.json`, one writer per file, like its metrics) and reads every tenant's
post: the verdict pools all of them. A run scores all its ready members before it trains those awaiting the
verdict (trainer.py), so the tenants of one run that reach the FM's first labeled window together judge on each
other's evidence. A run then waits, up to `young_fm_wait_s` (`awaited`, `wait_for_posts`), for the tenants that
will reach that window without it: those other runs are training towards it, and those queued for a slot or that
gave theirs up before it (runs take turns when there are more runs than slots). Asked to give up its own slot while
it waits for them, a run judges later: it yields with the window untrained (trainer.py), the others post, and it
scores the window again when it comes back. So runs that take turns, or that get there seconds apart, judge on the
same posts. A tenant added later pools with whatever had been posted by then (the FM is one model: its first
window's evidence stays evidence). Only active tenants' posts under their current registration count: not a
removed tenant's, nor a re-added one's from before.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from exfm_ray.files import atomic_write
from exfm_ray.observability import LOG
from exfm_ray.students.young_fm import RankEvidence
from exfm_ray.tenants.registry import TenantRegistry

BOARD_FILE = "young_fm.json"
# progress phases of tenants that will not reach a window while this run waits: failed, or held by their own run's
# wait (two runs each waiting for the other's held-back members would both sit out the timeout)
NOT_MOVING = ("failed", "pooling")


def post(registry: TenantRegistry, name: str, run_name: str, window: int, evidence: RankEvidence | None) -> None:
    path = registry.tenant_dir(name) / BOARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"run": run_name, "window": window, "evidence": evidence.to_dict() if evidence is not None else None}
    atomic_write(path, json.dumps(entry))


def posted(registry: TenantRegistry) -> dict[str, RankEvidence]:
    """Every active tenant's evidence posted so far, by tenant (posts without both classes, or unreadable, left out:
    one bad file must not stop every tenant's training)."""
    out = {}
    for name, entry in registry.entries().items():
        if entry.status != "active":
            continue
        try:
            post = registry.read_json(registry.tenant_dir(name) / BOARD_FILE) or {}
            if post.get("run") == entry.run_name and post.get("evidence"):
                out[name] = RankEvidence(**post["evidence"])
        except (ValueError, TypeError, AttributeError) as exc:
            LOG.warning("young FM board: %s's post left out: %s", name, exc)
    return out


def awaited(registry: TenantRegistry, window: int, hosted: set[str], turns: bool = True) -> list[str]:
    """Tenants worth waiting for before judging at `window`: active, judging the young FM, not yet posted under their
    current registration, not `hosted` here (they cannot move while this run waits), and by their progress on the
    way to `window`: in another run or, where runs take `turns` (following the stream: a run is asked to give up
    its slot for a queued one), queued for a slot or done (its run gave up its slot) before it."""
    out = []
    still = NOT_MOVING if turns else (*NOT_MOVING, "queued", "done")
    for name, entry in registry.entries().items():
        if entry.status != "active" or name in hosted or entry.config.distill().fm_gate_young_z is None:
            continue
        try:
            if (registry.read_json(registry.tenant_dir(name) / BOARD_FILE) or {}).get("run") == entry.run_name:
                continue
            progress = registry.progress(name)
            phase, at = progress.get("phase"), progress.get("window")  # "done": the last window it trained
            moving = progress.get("run") == entry.run_name and phase not in still and isinstance(at, int)
            if moving and at + (phase == "done") <= window:
                out.append(name)
        except (ValueError, TypeError, AttributeError):  # unreadable (files are replaced atomically: it stays so)
            continue
    return out


def wait_for_posts(
    registry: TenantRegistry,
    window: int,
    hosted: set[str],
    timeout_s: float,
    poll_s: float,
    turns: bool = True,
    stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Wait until no tenant is `awaited`, `timeout_s` (logged) or `stop()` (the run asked to give up its slot); returns
    those still awaited then."""
    deadline = time.monotonic() + timeout_s
    while (missing := awaited(registry, window, hosted, turns)) and time.monotonic() < deadline and not stop():
        sleep(poll_s)
    if missing and not stop():
        LOG.warning("young FM board: judged at window %d without %s (not posted within %.0f s)", window,
                    ", ".join(missing), timeout_s)  # fmt: skip
    return missing


def judge_later(
    registry: TenantRegistry,
    window: int,
    hosted: set[str],
    wait_s: float,
    poll_s: float,
    follow: bool,
    asked_to_yield: Callable[[], bool],
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Wait for the posts of the tenants `awaited`; True: give the slot up with the window untrained and judge when
    the run comes back, on the posts of those let in. Following the stream, runs take turns: when asked to yield
    while tenants are still awaited. Without it runs end rather than take turns: at once when, those in training
    having posted, tenants queued for a slot or yielded before the window are left. `wait_s` 0: judge now."""
    if wait_s <= 0:
        return False
    missing = wait_for_posts(registry, window, hosted, wait_s, poll_s, follow, asked_to_yield, sleep)
    if missing or follow:
        return bool(missing) and asked_to_yield()
    return bool(awaited(registry, window, hosted, turns=True))


def pooled(registry: TenantRegistry, rank: int = 0, world: int = 1, later: bool = False) -> dict | None:
    """Every post so far by tenant, to judge on, or None to judge `later` (rank 0's call); in a data-parallel run,
    rank 0's (read once) on every rank."""
    evidence = None if later or rank != 0 else posted(registry)
    if world > 1:
        import torch.distributed as dist

        box = [evidence]
        dist.broadcast_object_list(box, src=0)
        evidence = box[0]
    return evidence
