"""Where the tenants of `exfm run` pool their evidence on the young FM (students/young_fm.py).

Each tenant's trainer, on the FM's first labeled window, posts what its student and the FM scored there
(`<storage>/tenants/<name>/young_fm.json`, one writer per file, like its metrics) and reads every tenant's
post: the verdict pools all of them. A run scores all its ready members before it trains any (trainer.py),
so the tenants of one run, which start together, always judge on each other's evidence; a tenant of
another run, or one added later, pools with whatever had been posted by then (the FM is one model: its
first window's evidence stays evidence).
"""

from __future__ import annotations

import json

from exfm_ray.files import atomic_write
from exfm_ray.students.young_fm import RankEvidence, YoungVerdict, young_verdict
from exfm_ray.tenants.registry import TenantRegistry

BOARD_FILE = "young_fm.json"


def post(registry: TenantRegistry, name: str, run_name: str, window: int, evidence: RankEvidence | None) -> None:
    path = registry.tenant_dir(name) / BOARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"run": run_name, "window": window, "evidence": evidence.to_dict() if evidence is not None else None}
    atomic_write(path, json.dumps(entry))


def posted(registry: TenantRegistry) -> dict[str, RankEvidence]:
    """Every tenant's evidence posted so far, by tenant (posts without both classes left out)."""
    out = {}
    for path in sorted(registry.root.glob(f"*/{BOARD_FILE}")):
        evidence = (registry.read_json(path) or {}).get("evidence")
        if evidence:
            out[path.parent.name] = RankEvidence(**evidence)
    return out


def pooled(registry: TenantRegistry, z: float) -> YoungVerdict:
    return young_verdict(list(posted(registry).values()), z)
