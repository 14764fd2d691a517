"""The streaming ExFM experiment in one process.

Per seed: the FM trains one window at a time on the union of all tenants; after training through
window k it labels window k + delay. Each variant's student of each tenant then walks the
windows in time order: evaluate on window t (progressive validation), then train one pass on it.
Every variant of a seed reads the same FM labels, the same data and the same initial weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.sources import load_stream
from exfm_ray.data.stream import Stream
from exfm_ray.errors import ConfigError
from exfm_ray.experiment.config import ExperimentConfig
from exfm_ray.experiment.guarded import BLEND, CONTROL, base_rate_records, guarded_records
from exfm_ray.experiment.headroom import HEADROOM, headroom_scores
from exfm_ray.fm.learner import FMLearner, head_logit
from exfm_ray.fm.model import build_fm, count_parameters
from exfm_ray.fm.registry import window_labeled_by
from exfm_ray.loopfm.replay import attach_histories
from exfm_ray.metrics import evaluate
from exfm_ray.students.config import DEFAULT_VARIANT, variant
from exfm_ray.students.guard import blend
from exfm_ray.students.learner import StudentLearner
from exfm_ray.students.model import build_student
from exfm_ray.students.young_fm import RankEvidence, rank_evidence, young_verdict

Progress = Callable[[int, str], None]


@dataclass
class TenantWindow:
    """One tenant's rows of one window, and where they sit in the full window."""

    rows: WindowTensors
    index: torch.Tensor  # [n] positions in the full window


def run_experiment(
    cfg: ExperimentConfig, stream: Stream | None = None, progress: Progress | None = None, stats: dict | None = None
) -> list[dict]:
    """Run every seed and variant; returns one record per (seed, variant, tenant, window).

    `progress(steps, label)` is called as work completes; total steps = `count_steps(cfg, stream)`.
    `stats`, if given, receives what is not a record: the LoopFM store's size per seed, and the young FM's
    verdict per seed (fm_gate_young_z).
    """
    stream = stream or load_stream(cfg.source)
    spec = stream.spec
    unknown = sorted(set(cfg.fm_bias) - set(spec.tenant_names))
    if unknown:
        raise ConfigError(f"field 'fm_bias': unknown tenants {unknown}; the stream has {spec.tenant_names}")
    full = [WindowTensors(w, spec) for w in stream.windows]
    parts = [_split_by_tenant(stream, t, full[t]) for t in range(spec.num_windows)]
    records: list[dict] = []
    loop = any(variant(v).loopfm for v in cfg.variants)
    # the variants that judge the young FM, and their bar (fm_gate_young_z)
    judges = {v: z for v in cfg.variants if (z := variant(v, **cfg.knobs.model_dump()).fm_gate_young_z) is not None}
    for seed in range(cfg.seeds):
        fm_logits, hidden = _fm_labels(cfg, stream, full, seed, progress, keep_hidden=loop)
        fm_dim = 0
        if loop:
            by_window = [[p.rows for p in by.values()] for by in parts]
            manifest = attach_histories(cfg.student.loopfm, full, by_window, hidden)
            if stats is not None:
                last = manifest[max(manifest, key=int)]
                stats.setdefault("loopfm_store", []).append({"seed": seed, **last})
            fm_dim = next(h.shape[1] for h in hidden if h is not None)
        for t, by_tenant in enumerate(parts):
            for name, part in by_tenant.items():
                i = spec.tenant_names.index(name)
                if fm_logits[t] is None:
                    part.rows.set_fm(torch.zeros(len(part.index)), torch.zeros(len(part.index), dtype=torch.bool))
                    continue
                logit = head_logit(fm_logits[t][part.index], torch.full((len(part.index),), i))
                logit = logit + cfg.fm_bias.get(name, 0.0)
                part.rows.set_fm(logit, torch.ones(len(part.index), dtype=torch.bool))
                records.append(_record(seed, "fm", name, t, part.rows.label, torch.sigmoid(logit)))
        evidence = _young_evidence(cfg, stream, parts, seed) if judges else None
        if evidence is not None and stats is not None:
            on = {v: young_verdict(evidence, z).on for v, z in judges.items()}
            stats.setdefault("young_fm", []).append({"seed": seed, **young_verdict(evidence, 0.0).to_dict(), "on": on})
        for name in spec.tenant_names:
            preds: dict[str, dict[int, torch.Tensor]] = {v: {} for v in (DEFAULT_VARIANT, CONTROL) if v in cfg.variants}
            for v in cfg.variants:
                records += _run_student(cfg, stream, parts, seed, v, name, progress, fm_dim, preds.get(v), evidence)
            records += _blend_records(seed, name, parts, preds)
            if not cfg.leaky:  # at delay 0 the FM's logit, a feature of the fit, has seen the window it scores
                records += _headroom_records(seed, name, parts, preds.get(CONTROL))
    return records + _guard_records(cfg, parts, records)


def _blend_records(seed: int, tenant: str, parts: list[dict[str, TenantWindow]], preds: dict) -> list[dict]:
    """The guard's blend candidate: the mean of the default variant's and vm_only's probabilities
    (both trained from the same initial weights on the same batches), when both ran."""
    if DEFAULT_VARIANT not in preds or CONTROL not in preds:
        return []
    a, b = preds[DEFAULT_VARIANT], preds[CONTROL]
    return [_record(seed, BLEND, tenant, t, parts[t][tenant].rows.label, blend(a[t], b[t])) for t in sorted(a)]


def _headroom_records(
    seed: int, tenant: str, parts: list[dict[str, TenantWindow]], control: dict[int, torch.Tensor] | None
) -> list[dict]:
    """The FM's headroom over vm_only (experiment/headroom.py), where vm_only ran and the FM labeled."""
    if control is None:
        return []
    windows = []
    for t in sorted(control):
        rows = parts[t][tenant].rows
        labeled = bool(rows.fm_mask.all())
        windows.append((t, rows.label, control[t], rows.fm_logit if labeled else None))
    scores = headroom_scores(windows)
    return [_record(seed, HEADROOM, tenant, t, parts[t][tenant].rows.label, p) for t, p in sorted(scores.items())]


def _guard_records(cfg: ExperimentConfig, parts: list[dict[str, TenantWindow]], records: list[dict]) -> list[dict]:
    """The constant base-rate predictor, and what the guard would have served on top of the
    default variant (needs the default and vm_only among the variants)."""
    labels = {(name, t): part.rows.label.numpy() for t, by in enumerate(parts) for name, part in by.items()}
    flat = base_rate_records(records, labels, cfg.guard_windows)
    if DEFAULT_VARIANT not in cfg.variants or CONTROL not in cfg.variants:
        return flat
    return flat + guarded_records(records + flat, DEFAULT_VARIANT, cfg.guard_windows)


def count_steps(cfg: ExperimentConfig, num_windows: int, num_tenants: int) -> int:
    return cfg.seeds * num_windows * (1 + len(cfg.variants) * num_tenants)


def _split_by_tenant(stream: Stream, t: int, full: WindowTensors) -> dict[str, TenantWindow]:
    out = {}
    for i, name in enumerate(stream.spec.tenant_names):
        index = torch.nonzero(full.tenant == i).squeeze(1)
        if len(index):
            out[name] = TenantWindow(WindowTensors(stream.tenant_rows(t, name), stream.spec), index)
    return out


def _young_evidence(
    cfg: ExperimentConfig, stream: Stream, parts: list[dict[str, TenantWindow]], seed: int
) -> list[RankEvidence]:
    """Per tenant, the FM against the student on the FM's first labeled window (students/young_fm.py): the
    student trained on labels alone before it, which every variant's student is at that point (no FM label
    came before), so one pass of vm_only's serves them all."""
    labeled = [t for t, by in enumerate(parts) if any(bool(p.rows.fm_mask.any()) for p in by.values())]
    out: list[RankEvidence] = []
    for name in stream.spec.tenant_names if labeled else []:
        learner = _learner(cfg, stream, seed, "vm_only", name)
        for t, rows, p in _walk(learner, stream, parts, name, cfg.student.batch_size):
            if t == labeled[0]:
                e = rank_evidence(rows.label, rows.fm_logit, p, rows.fm_mask) if rows is not None else None
                out += [e] if e is not None else []
                break
    return out


def _learner(cfg: ExperimentConfig, stream: Stream, seed: int, variant_name: str, tenant: str, fm_dim: int = 0):
    spec = stream.spec
    distill = variant(variant_name, **cfg.knobs.model_dump())
    # Same init for every variant of a seed: the training-only heads are built after the shared parts.
    torch.manual_seed(seed * 1000 + spec.tenant_names.index(tenant))
    return StudentLearner(build_student(spec, tenant, cfg.student, distill, fm_dim), cfg.student, distill)


def _walk(
    learner: StudentLearner, stream: Stream, parts: list[dict[str, TenantWindow]], tenant: str, batch_size: int
) -> Iterator[tuple[int, WindowTensors | None, torch.Tensor | None]]:
    """Per window in time order: score the tenant's rows (progressive validation), yield (t, rows, scores), then
    train one pass on them; (t, None, None) where the tenant has no rows."""
    features, dense = learner.model.feature_names, stream.spec.tenant(tenant).dense
    for t, by_tenant in enumerate(parts):
        if tenant not in by_tenant:
            yield t, None, None
            continue
        rows = by_tenant[tenant].rows
        learner.begin_window(rows.label, rows.fm_logit, rows.fm_mask)
        p = torch.cat([learner.predict(b) for b in rows.batches(4096, features, dense)])
        learner.judge(p)
        yield t, rows, p
        for b in rows.batches(batch_size, features, dense):
            learner.step(b)


def _fm_labels(
    cfg: ExperimentConfig,
    stream: Stream,
    full: list[WindowTensors],
    seed: int,
    progress: Progress | None,
    keep_hidden: bool = False,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """FM logits [N, H] per window, from the FM trained through window t - delay (None: no FM yet),
    and (with `keep_hidden`) its embeddings [N, Dh] of those rows, what LoopFM stores."""
    torch.manual_seed(seed)
    learner = FMLearner(build_fm(stream.spec, cfg.fm), cfg.fm, seed=seed)
    labels: list[torch.Tensor | None] = [None] * len(full)
    hidden: list[torch.Tensor | None] = [None] * len(full)
    for k, rows in enumerate(full):
        learner.train_window(rows)
        target = window_labeled_by(k, cfg.fm_delay)
        if target < len(full):
            labels[target], h = learner.predict(full[target])
            hidden[target] = h if keep_hidden else None
        if progress:
            progress(1, f"seed {seed} fm window {k} ({count_parameters(learner.model):,} params)")
    return labels, hidden


def _run_student(
    cfg: ExperimentConfig,
    stream: Stream,
    parts: list[dict[str, TenantWindow]],
    seed: int,
    variant_name: str,
    tenant: str,
    progress: Progress | None,
    fm_dim: int = 0,
    preds: dict[int, torch.Tensor] | None = None,
    evidence: list[RankEvidence] | None = None,
) -> list[dict]:
    """The variant's records per window; `preds`, if given, receives its probabilities per window; `evidence`:
    the tenants' on the FM's first labeled window, for a variant that judges the young FM."""
    learner = _learner(cfg, stream, seed, variant_name, tenant, fm_dim)
    z = learner.distill.fm_gate_young_z
    if z is not None and evidence is not None:
        learner.settle_young(young_verdict(evidence, z))
    out = []
    for t, rows, p in _walk(learner, stream, parts, tenant, cfg.student.batch_size):
        if rows is not None:
            out.append(_record(seed, variant_name, tenant, t, rows.label, p))
            if preds is not None:
                preds[t] = p
        if progress:
            progress(1, f"seed {seed} {variant_name} {tenant} window {t}")
    return out


def _record(seed: int, variant_name: str, tenant: str, t: int, y: torch.Tensor, p: torch.Tensor) -> dict:
    return {"seed": seed, "variant": variant_name, "tenant": tenant, "window": t, **evaluate(y.numpy(), p.numpy())}


def timed(fn: Callable[[], list[dict]]) -> tuple[list[dict], float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not np.isnan(v)], dtype=float)
    if len(arr) == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
