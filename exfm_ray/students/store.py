"""Published student checkpoints on shared storage: what serving reads.

Layout (a filesystem path; on a cluster, storage every node mounts):

    <root>/students/<tenant>/versions/<version>/serving.pt, meta.json
    <root>/students/<tenant>/LATEST.json        {"version": ..., "published_at": ...}

Publishing writes the version folder first and then swaps LATEST.json atomically (write to a temp
file, os.replace), so a reader sees either the previous or the new version, never a partial one.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exfm_ray.errors import ConfigError, ExfmError
from exfm_ray.files import atomic_write
from exfm_ray.students.meta import StudentMeta, read_meta

if TYPE_CHECKING:  # the weights' side (torch): imported by the methods that touch weights
    from exfm_ray.students.model import ServingStudent, Student

LATEST = "LATEST.json"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Published:
    tenant: str
    version: str
    path: Path
    published_at: float


class StudentStore:
    def __init__(self, root: str | Path):
        self.root = Path(root) / "students"

    def publish(self, student: Student | ServingStudent, meta: StudentMeta) -> Published:
        _check_name(meta.tenant, "tenant")
        _check_name(meta.version, "version")
        from exfm_ray.students.checkpoint import save_student

        path = save_student(student, meta, self.root / meta.tenant / "versions" / meta.version)
        published = Published(meta.tenant, meta.version, path, time.time())
        atomic_write(
            self.root / meta.tenant / LATEST,
            json.dumps({"version": meta.version, "published_at": published.published_at}),
        )
        return published

    def unpublish(self, tenant: str) -> bool:
        """Stop serving a tenant: its LATEST.json goes (versions stay on storage). False if none."""
        pointer = self.root / tenant / LATEST
        if not valid_name(tenant) or not pointer.exists():
            return False
        pointer.unlink()
        return True

    def latest(self, tenant: str) -> Published | None:
        pointer = self.root / tenant / LATEST
        if not pointer.exists():
            return None
        data = json.loads(pointer.read_text())
        path = self.root / tenant / "versions" / data["version"]
        return Published(tenant, data["version"], path, data["published_at"])

    def tenants(self) -> list[str]:
        """Tenants with a published checkpoint."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / LATEST).exists())

    def load_latest(self, tenant: str) -> tuple[ServingStudent, StudentMeta]:
        pub = self.latest(tenant)
        if pub is None:
            raise ExfmError(f"tenant {tenant!r} has no published checkpoint under {self.root}")
        from exfm_ray.students.checkpoint import load_serving

        return load_serving(pub.path)

    def latest_meta(self, tenant: str) -> StudentMeta | None:
        pub = self.latest(tenant)
        return read_meta(pub.path) if pub else None


def valid_name(value: str) -> bool:
    """Tenant and version names are plain path segments: letters, digits, '_', '.', '-'."""
    return bool(_NAME.match(value)) and value not in (".", "..")


def _check_name(value: str, field: str) -> None:
    if not valid_name(value):
        raise ConfigError(f"{field} {value!r} must use only letters, digits, '_', '.', '-'")
