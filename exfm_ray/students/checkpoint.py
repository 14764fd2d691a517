"""Student checkpoints: the serving path's weights plus the metadata needed to rebuild and trust it.

A checkpoint folder holds `serving.pt` (state dict of ServingStudent: no aux head, no adapter;
where the guard served the blend, of BlendServing: both students' serving paths) and `meta.json`
(StudentMeta). Training state (optimizer, aux heads, adapter) is saved separately
by the trainers that resume; serving never loads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from exfm_ray.students.meta import META_FILE, StudentMeta, read_meta
from exfm_ray.students.model import BlendServing, ServingStudent, Student, serving_parts

SERVING_FILE = "serving.pt"


def save_student(student: Student | ServingStudent | BlendServing, meta: StudentMeta, path: str | Path) -> Path:
    """Write the serving checkpoint atomically: a reader sees the old folder or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    serving = student.serving_model() if isinstance(student, Student) else student
    # The tower's input size, from the model written: what serving needs to rebuild it.
    meta = meta.model_copy(update={"fm_dim": serving.loop.proj[0].in_features if serving.loop is not None else 0})
    torch.save(serving.state_dict(), tmp / SERVING_FILE)
    (tmp / META_FILE).write_text(meta.model_dump_json(indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_serving(path: str | Path) -> tuple[ServingStudent | BlendServing, StudentMeta]:
    """Rebuild the serving model from a checkpoint: only the serving path's classes are used."""
    meta = read_meta(path)
    cards = {f.name: f.cardinality for f in meta.features}
    multi = {f.name for f in meta.features if f.multi_valued}

    def build(fm_dim: int) -> ServingStudent:
        names = [f.name for f in meta.features]
        return ServingStudent(*serving_parts(names, cards, multi, len(meta.dense), meta.student, fm_dim))

    # the blend's control twin never reads LoopFM histories
    model = BlendServing(build(meta.fm_dim), build(0)) if meta.served == "blend" else build(meta.fm_dim)
    model.load_state_dict(torch.load(Path(path) / SERVING_FILE, weights_only=True))
    model.eval()
    return model, meta
