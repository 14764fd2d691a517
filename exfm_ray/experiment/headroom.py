"""The FM's headroom over the student alone: a reference row of the experiment, not a student.

Per tenant and window t, a logistic fit of the labels on [the student alone's logit, the FM's logit, 1], on
every earlier window the FM labeled (the labels a trainer has when it trains on t), shrunk towards the student
as it is; scored on window t. It reads the FM's label of the row it scores, which a served student never has,
and it is one narrow model (three weights, every earlier window alike): a gauge of what the FM's labels add to
the student's scores, not a bound on what distillation can win (docs/results.md, "The FM's headroom").
"""

from __future__ import annotations

import torch

from exfm_ray.students.calibration import logistic_fit

HEADROOM = "fm_headroom"
# Nats per unit pulling the fit towards the student as it is (weights 1, 0, 0): with a handful of
# positives an unshrunk fit of the FM's far overconfident logits is mostly noise.
HEADROOM_PRIOR = 1.0
_CENTER = torch.tensor([1.0, 0.0, 0.0])


def headroom_scores(
    windows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]], prior: float = HEADROOM_PRIOR
) -> dict[int, torch.Tensor]:
    """`windows`: (t, labels, the student alone's probabilities, the FM's logits or None where the FM did not
    label the window) in time order. Returns, for each window the FM labeled, the fitted probabilities (on the
    first one, with nothing to fit on, the fit's centre: the student as it is); window t's labels never reach its
    own scores."""
    seen_y: list[torch.Tensor] = []
    seen_x: list[torch.Tensor] = []
    out: dict[int, torch.Tensor] = {}
    for t, y, p, f in windows:
        if f is None:
            continue
        design = torch.stack(
            [torch.logit(p.double(), eps=1e-6), f.double(), torch.ones(len(y), dtype=torch.float64)], 1
        )
        w = logistic_fit(torch.cat(seen_y), torch.cat(seen_x), _CENTER, prior) if seen_y else _CENTER.double()
        out[t] = torch.sigmoid(design @ w).float()
        seen_y.append(y)
        seen_x.append(design)
    return out
