"""Whether a young FM gets the benefit of the doubt: one question for all tenants (fm_gate_young_z).

The FM is one model, so whether it ranks better than the students do is one question, asked of every
tenant's rows at once. On the FM's first labeled window each tenant's student has learnt from labels
alone (no FM label came before), so its scores of that window, taken before training on it, are what
the student knows without the FM. Per tenant: the FM's AUC minus the student's, with Hanley-McNeil
variances (the two AUCs taken as independent). Pooled over tenants by inverse variance, the young FM
keeps the benefit of the doubt (fm_gate_young_aux, fm_gate_young_prior) only if the pooled gap is
above fm_gate_young_z standard errors. One tenant's window holds too few positives to tell (stop 38's
per-tenant ranking gate gave up synthetic-ads-rare's lead); pooled, movielens-rare's FM, which barely
ranks, is told from synthetic-ads-rare's (docs/results.md, "Judging the young FM across tenants").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from exfm_ray.metrics import auc


@dataclass(frozen=True)
class RankEvidence:
    """One tenant's rows of the FM's first labeled window: both AUCs and the labels' counts."""

    fm_auc: float
    student_auc: float
    positives: int
    negatives: int

    @property
    def gap(self) -> float:
        return self.fm_auc - self.student_auc

    @property
    def variance(self) -> float:
        return auc_variance(self.fm_auc, self.positives, self.negatives) + auc_variance(
            self.student_auc, self.positives, self.negatives
        )

    def to_dict(self) -> dict:
        return asdict(self)


def auc_variance(a: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982): the variance of an AUC estimated on these many positives and negatives. An AUC of 0
    or 1 on a handful of rows is not certainty: it counts as half a row from the end (else one tenant with one
    positive, ranked first by both, would outweigh all the others)."""
    edge = 1 / (2 * min(positives, negatives))
    a = min(max(a, edge), 1 - edge)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (positives * negatives)


def rank_evidence(
    labels: torch.Tensor, fm_logit: torch.Tensor, student_p: torch.Tensor, mask: torch.Tensor
) -> RankEvidence | None:
    """The FM's and the student's ranking of the rows the FM labeled; None without both classes."""
    y = labels[mask].numpy()
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return None
    fm_p, student = torch.sigmoid(fm_logit[mask]), student_p[mask]
    if not (torch.isfinite(fm_p).all() and torch.isfinite(student).all()):
        return None  # a diverged model's scores say nothing of which ranks better
    return RankEvidence(auc(y, fm_p.numpy()), auc(y, student.numpy()), positives, negatives)


@dataclass(frozen=True)
class YoungVerdict:
    """The pooled gap over the tenants with evidence, its z, and whether it clears the bar."""

    gap: float
    z: float
    tenants: int
    on: bool

    def to_dict(self) -> dict:
        return asdict(self)


def young_verdict(evidence: list[RankEvidence], z: float) -> YoungVerdict:
    """No evidence at all (no tenant with both classes): no benefit of the doubt."""
    num = den = 0.0
    for e in evidence:
        num, den = num + e.gap / e.variance, den + 1 / e.variance
    if den == 0:
        return YoungVerdict(0.0, 0.0, 0, False)
    gap = num / den
    pooled_z = gap * math.sqrt(den)
    return YoungVerdict(gap, pooled_z, len(evidence), pooled_z > z)
