"""Evaluation metrics (exfm-method.md section 9): NE, AUC, log loss, calibration, transfer ratio."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.metrics.ne import compute_cross_entropy, compute_ne

EPS = 1e-7


def _as_tensors(y, p) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.as_tensor(np.asarray(y, dtype=np.float64))
    p = torch.as_tensor(np.asarray(p, dtype=np.float64)).clamp(EPS, 1 - EPS)
    assert y.shape == p.shape, (y.shape, p.shape)
    return y, p


def log_loss(y, p) -> float:
    y, p = _as_tensors(y, p)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def ne(y, p) -> float:
    """Normalized entropy: log loss divided by the entropy of the evaluation data's positive rate.

    1.0 = no better than predicting the base rate; lower is better. NaN if only one class.
    """
    y, p = _as_tensors(y, p)
    pos = y.sum()
    if pos == 0 or pos == len(y):
        return math.nan
    # torchrec computes both the cross-entropy and its normalizer in log2; they must match.
    ce_sum = compute_cross_entropy(y, p, torch.ones_like(y), eta=EPS).sum()
    return float(compute_ne(ce_sum, torch.tensor(float(len(y))), pos, len(y) - pos, eta=EPS))


def auc(y, p) -> float:
    y, p = _as_tensors(y, p)
    if y.min() == y.max():
        return math.nan
    return float(binary_auroc(p, y.long()))


def calibration(y, p) -> float:
    """Mean prediction / mean label; 1.0 is perfect."""
    y, p = _as_tensors(y, p)
    return float(p.mean() / y.mean()) if y.sum() > 0 else math.nan


def evaluate(y, p) -> dict[str, float]:
    y_arr = np.asarray(y)
    return {
        "ne": ne(y, p),
        "auc": auc(y, p),
        "log_loss": log_loss(y, p),
        "calibration": calibration(y, p),
        "rows": int(len(y_arr)),
        "positives": int(np.sum(y_arr)),
    }


def transfer_ratio(ne_alone: float, ne_student: float, ne_fm: float) -> float:
    """The share of the FM's gain over the student alone that the distilled student captures:
    (NE_alone - NE_student) / (NE_alone - NE_FM), on the same rows. 1 = the student is as good as
    the FM, 0 = no better than alone, < 0 = worse. NaN when the FM is not better than the student
    alone (there is no gain to capture)."""
    gain = ne_alone - ne_fm
    if not all(math.isfinite(x) for x in (ne_alone, ne_student, ne_fm)) or gain <= 0:
        return math.nan
    return (ne_alone - ne_student) / gain


def snapshot_transfer_ratio(ne_fm_a: float, ne_fm_b: float, ne_vm_a: float, ne_vm_b: float) -> float:
    """TR = dNE_VM / dNE_FM (relative NE changes) for FM snapshots A (weaker) and B (stronger),
    with the VM distilled from A and from B, on the same evaluation windows."""
    d_fm = (ne_fm_a - ne_fm_b) / ne_fm_a
    d_vm = (ne_vm_a - ne_vm_b) / ne_vm_a
    return d_vm / d_fm if d_fm != 0 else math.nan
