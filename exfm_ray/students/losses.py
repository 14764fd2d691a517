"""Every loss of ExFM student training, as pure functions (exfm-method.md sections 5-7).

Notation: s serving logit, d FM aux logit, d2 SA aux logit, y true label, f FM logit (a logged
constant), m FM mask. All per-row tensors are [B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exfm_ray.students.config import DistillConfig


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:
        ctx.beta = beta
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.beta, None


def grad_scale(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by beta on the way back (gradient scaling)."""
    return x if beta == 1.0 else _GradScale.apply(x, beta)


def bce(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row BCE-with-logits."""
    return F.binary_cross_entropy_with_logits(logit, target, reduction="none")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, norm: str = "mask") -> torch.Tensor:
    """Mean over rows where mask is set; by mask count ('mask') or batch size ('batch'). 0 if empty."""
    m = mask.to(values.dtype)
    denom = m.sum() if norm == "mask" else torch.tensor(float(values.numel()))
    return (values * m).sum() / denom.clamp(min=1.0)


def fm_target(fm_logit: torch.Tensor, alpha: float) -> torch.Tensor:
    """Label-scaled FM target min(1, alpha * p_F), detached: the FM label is a constant."""
    return torch.clamp(alpha * torch.sigmoid(fm_logit.detach()), max=1.0)


def serving_loss(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_s: the serving head learns from true labels only."""
    return bce(s, y).mean()


def aux_fm_loss(d: torch.Tensor, fm_logit: torch.Tensor, mask: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """L_d: the aux head learns the (label-scaled) FM prediction."""
    return masked_mean(bce(d, fm_target(fm_logit, cfg.alpha)), mask, cfg.mask_norm)


def single_head_kd_loss(s: torch.Tensor, fm_logit: torch.Tensor, mask: torch.Tensor, cfg: DistillConfig):
    """KD baseline's distillation term: the FM target pulls on the serving head itself."""
    return masked_mean(bce(s, fm_target(fm_logit, cfg.alpha)), mask, cfg.mask_norm)


def adapter_loss(sa_logit: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """L_sta (Eq. 6): the adapter maps the FM prediction onto the current window's true labels."""
    return masked_mean(bce(sa_logit, y), mask, cfg.mask_norm)


def aux_sa_loss(d2: torch.Tensor, t_sa: torch.Tensor, mask: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """L_sa (Eq. 7): the SA aux head learns the adapted label, under stop-gradient."""
    return masked_mean(bce(d2, t_sa.detach()), mask, cfg.mask_norm)


def kd_loss(
    logit: torch.Tensor, fm_logit: torch.Tensor, mask: torch.Tensor, t_sa: torch.Tensor | None, cfg: DistillConfig
) -> torch.Tensor:
    """One head's distillation term: the adapted label where there is an adapter, else the (label-scaled) FM's."""
    return aux_sa_loss(logit, t_sa, mask, cfg) if t_sa is not None else single_head_kd_loss(logit, fm_logit, mask, cfg)


def student_loss(
    s: torch.Tensor,
    d: torch.Tensor | None,
    d2: torch.Tensor | None,
    y: torch.Tensor,
    fm_logit: torch.Tensor,
    mask: torch.Tensor,
    t_sa: torch.Tensor | None,
    cfg: DistillConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The VM objective of Algorithm 1 step 3 for the configured variant. Returns (loss, parts)."""
    loss = serving_loss(s, y)
    parts = {"serving": float(loss.detach())}
    if cfg.mode == "single_head":
        # With an adapter the serving head learns the adapted label (the FM mapped onto fresh labels).
        kd = kd_loss(s, fm_logit, mask, t_sa, cfg)
        loss = loss + cfg.w * kd
        parts["kd"] = float(kd.detach())
    elif cfg.mode == "aux_head":
        assert d is not None
        ld = aux_fm_loss(d, fm_logit, mask, cfg)
        loss = loss + cfg.w * ld
        parts["aux_fm"] = float(ld.detach())
        if cfg.adapter:
            assert d2 is not None and t_sa is not None
            lsa = aux_sa_loss(d2, t_sa, mask, cfg)
            loss = loss + cfg.w_sa * lsa
            parts["aux_sa"] = float(lsa.detach())
        if cfg.w_serving > 0:
            target = t_sa.detach() if t_sa is not None else fm_target(fm_logit, cfg.alpha)
            ls = masked_mean(bce(s, target), mask, cfg.mask_norm)
            loss = loss + cfg.w_serving * ls
            parts["serving_kd"] = float(ls.detach())
    return loss, parts


def young_fm_loss(
    s: torch.Tensor,
    a: torch.Tensor | None,
    y: torch.Tensor,
    fm_logit: torch.Tensor,
    mask: torch.Tensor,
    t_sa: torch.Tensor | None,
    rate: float,
    prior: float,
    cfg: DistillConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A window the gate distrusts, with the FM too young for a floor. The serving head learns the labels and,
    at w * prior (fm_gate_young_prior, or 0 while the student beats the constant), the tenant's constant rate
    `rate` (the kind of predictor that beat the FM's labels), so the serving head is still pulled towards a
    teacher, the better one. The young aux head `a` learns `t_sa` (the adapted or the recalibrated FM label, by
    fm_gate_young_target; the FM's own where there is neither) at w * fm_gate_young_aux: what the FM ranks still
    reaches the backbone; its calibration, which the gate found wanting, does not reach the serving head."""
    ls = serving_loss(s, y)
    loss, parts = ls, {"serving": float(ls.detach())}
    if prior > 0:
        lp = masked_mean(bce(s, torch.full_like(s, rate)), mask, cfg.mask_norm)
        loss = loss + cfg.w * prior * lp
        parts["young_prior"] = float(lp.detach())
    if a is not None:
        kd = kd_loss(a, fm_logit, mask, t_sa, cfg)
        loss = loss + cfg.w * cfg.fm_gate_young_aux * kd
        parts["young_aux"] = float(kd.detach())
    return loss, parts
