"""Where the tenants of `exfm run` pool their evidence on the young FM (students/young_fm.py).

Each tenant's trainer, on the FM's first labeled window, posts what its student and the FM scored there
(`<storage>/tenants/<name>/young_fm.json`, one writer per file, like its metrics) and reads every tenant's
post: the verdict pools all of them. A run scores all its ready members before it trains those awaiting the
verdict (trainer.py), so the tenants of one run that reach the FM's first labeled window together judge on each
other's evidence; a tenant of another run, or one added later, pools with whatever had been posted by then (the FM
is one model: its first window's evidence stays evidence). Only active tenants' posts under their current
registration count: not a removed tenant's, nor a re-added one's from before.
"""

from __future__ import annotations

import json

from exfm_ray.files import atomic_write
from exfm_ray.observability import LOG
from exfm_ray.students.young_fm import RankEvidence
from exfm_ray.tenants.registry import TenantRegistry

BOARD_FILE = "young_fm.json"


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


def pooled(registry: TenantRegistry, rank: int = 0, world: int = 1) -> list[RankEvidence]:
    """The evidence of every post so far, to judge on; in a data-parallel run, rank 0's (read once) on every rank."""
    evidence = list(posted(registry).values()) if rank == 0 else None
    if world > 1:
        import torch.distributed as dist

        box = [evidence]
        dist.broadcast_object_list(box, src=0)
        evidence = box[0]
    return evidence
