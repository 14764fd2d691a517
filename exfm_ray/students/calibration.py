"""Platt recalibration of the FM's labels: y ~ sigmoid(a * fm_logit + b), fitted on labels the
trainer has. The FM ranks well and calibrates badly where positives are rare (it is trained on the
union of tenants, and on windows before this one); distilling its raw probabilities teaches a
student the FM's calibration error along with its ranking (docs/results.md, "The FM gate")."""

from __future__ import annotations

import torch

# An in-sample Platt fit has one more free parameter than the constant it is judged against:
# charge it (AIC, in nats).
PLATT_PENALTY = 1.0


def platt_fit(labels: torch.Tensor, logit: torch.Tensor, prior: float = 0.0, iters: int = 30) -> tuple[float, float]:
    """(a, b) minimizing the summed log loss of sigmoid(a * logit + b) plus prior / 2 * ((a - 1)^2 + b^2).

    The prior pulls towards the identity (the FM as it is), worth `prior` nats per unit: with a
    handful of positives the fit is mostly noise.
    """
    x = logit.double()
    a, b = logistic_fit(labels, torch.stack([x, torch.ones_like(x)], 1), torch.tensor([1.0, 0.0]), prior, iters)
    return float(a), float(b)


def logistic_fit(
    labels: torch.Tensor, design: torch.Tensor, center: torch.Tensor, prior: float = 0.0, iters: int = 30
) -> torch.Tensor:
    """Weights w minimizing the summed log loss of sigmoid(design @ w) plus (prior + 1e-3) / 2 * |w - center|^2
    (the 1e-3 keeps the Newton system solvable where columns are constant or collinear).

    Newton's method from `center`, halving a step that does not lower the objective (nearly separable
    data make full steps overshoot).
    """
    y, x = labels.double(), design.double()
    center = center.double()
    reg = (prior + 1e-3) * torch.eye(len(center), dtype=torch.float64)

    def objective(w: torch.Tensor) -> float:
        nll = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y, reduction="sum")
        return float(nll) + 0.5 * float((w - center) @ reg @ (w - center))

    w, current = center.clone(), objective(center)
    for _ in range(iters):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) + reg @ (w - center)
        hess = (x * (p * (1 - p)).unsqueeze(1)).T @ x + reg
        step = torch.linalg.solve(hess, grad)
        for _ in range(20):
            value = objective(w - step)
            if value <= current:
                break
            step = step / 2
        else:
            break
        w, converged = w - step, current - value < 1e-9 * max(current, 1.0)
        current = value
        if converged:
            break
    return w
