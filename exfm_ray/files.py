"""Small file helpers shared by the stores of checkpoints and manifests."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a partial file (write temp, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def json_safe(obj):
    """NaN and inf -> None, tuples -> lists, recursively: what strict JSON (allow_nan=False) accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
