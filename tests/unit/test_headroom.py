"""The FM's headroom over the student alone (experiment/headroom.py): a fit on earlier windows only."""

import pytest
import torch

from exfm_ray.experiment.headroom import headroom_scores
from exfm_ray.metrics import ne

pytestmark = pytest.mark.unit


def _windows(fm_knows: bool, n: int = 4000, seed: int = 0):
    """Four windows of 4,000 rows at ~5% positives. Hidden truth z; the student sees a weak share of it, the
    FM (from window 1) the rest, overconfident (3x), or nothing (noise)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(4):
        a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
        y = (torch.rand(n, generator=g) < torch.sigmoid(-3.2 + 0.4 * a + 1.2 * b)).float()
        p = torch.sigmoid(-3.0 + 0.4 * a)
        f = 3 * (-3.0 + 1.2 * b) if fm_knows else 3 * torch.randn(n, generator=g)
        out.append((t, y, p, f if t >= 1 else None))
    return out


def _ne(windows, scores, t):
    return ne(windows[t][1].numpy(), scores[t].numpy())


def test_the_headroom_finds_what_the_fm_knows_and_costs_little_where_it_knows_nothing():
    knows = _windows(fm_knows=True)
    scores = headroom_scores(knows)
    assert sorted(scores) == [1, 2, 3]  # every window the FM labeled ...
    assert torch.allclose(scores[1], knows[1][2], atol=1e-6)  # ... the first with nothing to fit on: the student
    for t in (2, 3):
        student = ne(knows[t][1].numpy(), knows[t][2].numpy())
        assert _ne(knows, scores, t) < student - 0.05  # the FM's signal, recalibrated from its 3x overconfidence
    noise = _windows(fm_knows=False)
    scores = headroom_scores(noise)
    for t in (2, 3):
        student = ne(noise[t][1].numpy(), noise[t][2].numpy())
        assert _ne(noise, scores, t) < student + 0.01  # a fit towards the student, not the FM's noise


def test_a_windows_own_labels_never_reach_its_headroom_score():
    windows = _windows(fm_knows=True)
    base = headroom_scores(windows)
    t, y, p, f = windows[3]
    flipped = [*windows[:3], (t, 1 - y, p, f)]
    assert torch.equal(headroom_scores(flipped)[3], base[3])
    t, y, p, f = windows[2]
    earlier = [*windows[:2], (t, 1 - y, p, f), windows[3]]
    assert not torch.allclose(headroom_scores(earlier)[3], base[3])  # ... an earlier window's do
