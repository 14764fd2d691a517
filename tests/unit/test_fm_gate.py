"""The FM gate: when a student distills the FM's labels and when it learns from labels alone
(docs/results.md, "The FM gate" and after)."""

import dataclasses

import pytest
import torch

from exfm_ray.students.config import DEFAULT_VARIANT, StudentConfig, variant
from exfm_ray.students.learner import StudentLearner
from exfm_ray.students.model import build_student

pytestmark = pytest.mark.unit


def test_fm_gate_drops_distillation_on_windows_where_the_fm_loses_to_the_base_rate(world):
    from exfm_ray.students.learner import fm_and_constant_loss

    spec, rows = world
    b = rows.batch(0, 64, spec.tenant("feed").features, spec.tenant("feed").dense)
    y = b.label
    wrong = torch.where(y > 0, -4.0, 4.0)  # confidently backwards: worse than any constant
    rate = float(y.mean())
    good, flat, _ = fm_and_constant_loss(y, -wrong, rate)
    bad, _, _ = fm_and_constant_loss(y, wrong, rate)
    assert good < flat < bad
    mask = torch.ones_like(y, dtype=torch.bool)
    kd = {}
    for gate in (True, False):
        distill = variant("kd_sa@fm_gate_floor=0" if gate else "kd_sa@fm_gate=false")
        torch.manual_seed(0)
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
        learner.begin_window(y, wrong, mask)
        assert learner.fm_trusted is not gate
        parts = learner.step(dataclasses.replace(b, fm_logit=wrong, fm_mask=mask))
        kd[gate] = parts.get("kd", 0.0)  # the serving head's (a young FM's label may go to an aux head)
        assert parts["adapter"] > 0  # the adapter learns either way
        for _ in range(3):  # later windows where the FM is good: trusted again once they outweigh the bad one
            learner.begin_window(y, -wrong, mask)
        assert learner.fm_trusted
    assert kd[True] == 0.0 and kd[False] > 0.0
    assert not variant("kd_single_head").fm_gate and not variant("ah_sa").fm_gate  # the paper's variants: off


def test_platt_fit_recovers_a_known_recalibration_and_shrinks_a_thin_one():
    from exfm_ray.students.calibration import platt_fit

    g = torch.Generator().manual_seed(0)
    f = torch.randn(20000, generator=g) * 2 - 3
    y = (torch.rand(20000, generator=g) < torch.sigmoid(0.5 * f + 0.8)).float()
    a, b = platt_fit(y, f)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(0.8, abs=0.1)
    thin = torch.zeros(300)
    thin[int(torch.argmax(f[:300]))] = 1.0  # one positive, ranked first: nearly separable
    loose, shrunk = platt_fit(thin, f[:300]), platt_fit(thin, f[:300], prior=5.0)
    assert abs(shrunk[0] - 1) + abs(shrunk[1]) < abs(loose[0] - 1) + abs(loose[1])


def test_fallback_calibration_trusts_a_ranking_fm_that_loses_only_by_its_calibration(world):
    spec, _ = world
    g = torch.Generator().manual_seed(1)
    f = torch.randn(4000, generator=g) * 2 - 3
    y = (torch.rand(4000, generator=g) < torch.sigmoid(0.4 * f - 1.5)).float()
    overconfident = 3 * f + 4  # same ranking, far off in calibration: loses to the constant
    mask = torch.ones_like(y, dtype=torch.bool)
    seen = {}
    for name in ("kd_sa", "kd_sa@fm_gate_target=calibrated,fm_calibrate=fallback"):
        distill = variant(name)
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
        learner.begin_window(y, overconfident, mask)
        seen[name] = (learner.fm_trusted, learner.fm_affine)
    assert seen["kd_sa"] == (False, (1.0, 0.0))
    trusted, (a, b) = seen["kd_sa@fm_gate_target=calibrated,fm_calibrate=fallback"]
    assert trusted and a == pytest.approx(0.4 / 3, abs=0.05)
    # ... and where the FM as it is beats the constant, it is distilled as it is
    distill = variant("kd_sa@fm_gate_target=calibrated,fm_calibrate=fallback")
    learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
    learner.begin_window(y, 0.4 * f - 1.5, mask)
    assert learner.fm_trusted and learner.fm_affine == (1.0, 0.0)


def test_gate_evidence_is_the_newest_windows_holding_enough_positives():
    import math

    from exfm_ray.students.learner import pooled_evidence

    # (fm loss, constant loss, positives, standard error of their difference)
    record = [(10.0, 1.0, 40.0, 0.0), (1.0, 2.0, 5.0, 3.0), (1.0, 2.0, 30.0, 4.0)]
    assert pooled_evidence(record, 30) == (1.0, 2.0, 4.0)  # the newest window alone holds 30
    assert pooled_evidence(record, 35) == (2.0, 4.0, 5.0)  # windows' errors add in quadrature
    assert pooled_evidence(record, 60) == (12.0, 5.0, 5.0)  # reaches back to the bad old window
    assert pooled_evidence(record, 1000) == (12.0, 5.0, 5.0)  # fewer positives than asked: all of it
    assert pooled_evidence([(0.0, 0.0, 1.0, 9.0)] * 5 + record, math.inf) == (12.0, 5.0, 5.0)  # inf: the last 3


def test_a_gate_margin_distrusts_the_fm_only_when_it_loses_beyond_the_noise_of_its_positives(world):
    """An FM that knows nothing (noise around the right rate) loses to the constant on every window.
    On ~10 positives a window that loss is within noise: with fm_gate_z=2, once the gate has 3 windows
    of record, the student distills (at ads rates the FM's ranking of the negatives is what helps,
    docs/results.md); on ~1,000 positives the loss is clear: it does not. Before 3 windows, and in the
    default gate (no margin), the FM is distrusted in both."""
    from exfm_ray.priors import prior_logit
    from exfm_ray.students.learner import fm_and_constant_loss

    spec, _ = world
    g = torch.Generator().manual_seed(2)
    margin = f"{DEFAULT_VARIANT}@fm_gate_z=2"
    for rate, clear in ((0.002, False), (0.2, True)):
        y = (torch.rand(5000, generator=g) < rate).float()
        fm = torch.randn(5000, generator=g) + prior_logit(rate)
        fm_loss, flat, spread = fm_and_constant_loss(y, fm, float(y.mean()))
        assert fm_loss > flat and spread > 0
        mask = torch.ones_like(y, dtype=torch.bool)
        trusted = {}
        for name in (DEFAULT_VARIANT, margin):
            distill = variant(name)
            learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
            trusted[name] = []
            for _ in range(3):
                learner.begin_window(y, fm, mask)
                trusted[name].append(learner.fm_trusted)
        assert trusted == {DEFAULT_VARIANT: [False] * 3, margin: [False, False, not clear]}, (rate, fm_loss - flat)


def test_a_gate_against_the_student_trusts_an_fm_whose_mix_beats_the_student(world):
    """fm_gate_against='student' (off by default; docs/results.md, 'A gate that judges the FM against the
    student'): the FM is trusted while the mix the distillation pulls towards, (p_student + w p_FM) / (1 + w),
    beats the student's own scores of the window, even where the FM loses to the constant; an FM that is
    confidently backwards is distrusted either way. Until the student has scored the window, nothing changes."""
    spec, _ = world
    y = (torch.arange(2000) % 10 == 0).float()  # 10% positives
    mask = torch.ones_like(y, dtype=torch.bool)
    ranks = torch.where(y > 0, 1.0, -0.5)  # ranks every row right, overconfident: loses to the constant
    backwards = torch.where(y > 0, -4.0, 4.0)
    unsure = torch.full_like(y, 0.5)  # the student's scores
    trusted = {}
    for name in (DEFAULT_VARIANT, f"{DEFAULT_VARIANT}@fm_gate_against=student"):
        for label, fm in (("ranks", ranks), ("backwards", backwards)):
            distill = variant(name)
            learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
            learner.begin_window(y, fm, mask)
            learner.judge(unsure)
            trusted[(name.partition("@")[2] or "constant", label)] = learner.fm_trusted
            learner.judge(torch.zeros_like(y))  # judged once per window: a second call changes nothing
            assert learner.fm_trusted == trusted[(name.partition("@")[2] or "constant", label)]
    assert trusted == {
        ("constant", "ranks"): False, ("constant", "backwards"): False,
        ("fm_gate_against=student", "ranks"): True, ("fm_gate_against=student", "backwards"): False,
    }  # fmt: skip


def test_a_gate_floor_keeps_that_share_of_the_distillation_in_distrusted_windows(world):
    spec, rows = world
    b = rows.batch(0, 64, spec.tenant("feed").features, spec.tenant("feed").dense)
    y = b.label
    wrong = torch.where(y > 0, -4.0, 4.0)  # loses to any constant: the gate distrusts it
    mask = torch.ones_like(y, dtype=torch.bool)
    out = {}
    for floor in (0.0, 0.5, 1.0):
        distill = variant(f"kd_sa@fm_gate_floor={floor}")
        torch.manual_seed(0)
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
        learner.begin_window(y, wrong, mask)
        assert not learner.fm_trusted
        young = learner.step(dataclasses.replace(b, fm_logit=wrong, fm_mask=mask))
        assert young.get("kd", 0.0) == 0.0  # an FM with one window of record gets no floor on the serving head
        torch.manual_seed(0)
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
        for _ in range(3):
            learner.begin_window(y, wrong, mask)
        assert not learner.fm_trusted
        parts = learner.step(dataclasses.replace(b, fm_logit=wrong, fm_mask=mask))
        out[floor] = (parts["total"] - parts["serving"], parts["kd"])
    assert out[0.0][0] == pytest.approx(0.0, abs=1e-6) and out[0.0][1] == 0.0
    kd = out[1.0][1]
    assert kd > 0 and out[0.5][1] == pytest.approx(kd)  # same target and start: the same term...
    assert out[0.5][0] == pytest.approx(0.5 * kd, rel=1e-5) and out[1.0][0] == pytest.approx(kd, rel=1e-5)  # ...weighed
    assert variant(DEFAULT_VARIANT).fm_gate_floor == 0.5 and variant("kd_single_head").fm_gate_floor == 0.0


def test_a_young_distrusted_fm_teaches_the_backbone_through_an_aux_head_never_the_serving_head(world):
    """fm_gate_young_aux (kd_sa: 0.5): in a window the gate distrusts before it has 3 windows of record, the
    FM's label (recalibrated in kd_sa) goes to a training-only head at w * share. The serving head's gradient is
    the labels' alone (the same as with the FM's labels dropped); the backbone's is not. Trusted windows and the
    floor's windows train as before, and a checkpoint from before the head loads with a fresh one."""
    spec, rows = world
    b = rows.batch(0, 64, spec.tenant("feed").features, spec.tenant("feed").dense)
    y = b.label
    wrong = dataclasses.replace(b, fm_logit=torch.where(y > 0, -4.0, 4.0), fm_mask=torch.ones_like(y, dtype=torch.bool))
    grads, learners = {}, {}
    for share in (0.25, 0.0):
        distill = variant(f"{DEFAULT_VARIANT}@fm_gate_young_aux={share},fm_gate_young_prior=0")
        torch.manual_seed(0)
        learner = learners[share] = StudentLearner(build_student(spec, "feed", StudentConfig(), distill),
                                                   StudentConfig(), distill)  # fmt: skip
        learner.begin_window(y, wrong.fm_logit, wrong.fm_mask)
        assert not learner.fm_trusted
        parts = learner.step(wrong)
        m = learner.model
        grads[share] = (m.serving_head.weight.grad.clone(), next(m.backbone.parameters()).grad.clone())
        assert parts.get("kd", 0.0) == 0.0  # no FM term on the serving head
        if share:
            assert parts["young_aux"] > 0 and m.aux_young.weight.grad.abs().sum() > 0
            assert parts["total"] > parts["serving"]
        else:
            assert m.aux_young is None and parts["total"] == parts["serving"]
    assert torch.equal(grads[0.25][0], grads[0.0][0])
    assert not torch.allclose(grads[0.25][1], grads[0.0][1])
    learner = learners[0.25]
    for _ in range(2):  # 3 windows of record: the floor's share on the serving head, the young head idle
        learner.begin_window(y, wrong.fm_logit, wrong.fm_mask)
    parts = learner.step(wrong)
    assert parts["kd"] > 0 and "young_aux" not in parts and learner.model.aux_young.weight.grad is None
    old = learners[0.0].state_dict()
    learner.load_state_dict(old)
    assert torch.equal(learner.model.serving_head.weight, learners[0.0].model.serving_head.weight)
    assert torch.equal(learner.model.aux_young.bias, learners[0.0].model.serving_head.bias)
    assert "young_aux" in learner.step(wrong)
    assert variant(DEFAULT_VARIANT).fm_gate_young_aux == 0.5 and variant("kd_single_head").fm_gate_young_aux == 0
    assert variant(DEFAULT_VARIANT).fm_gate_young_target == "calibrated"


def test_a_young_distrusted_fm_leaves_the_serving_head_the_constant_that_beat_it(world):
    """fm_gate_young_prior (kd_sa: 1): in those windows the serving head learns the labels and, at w * share, the
    tenant's constant rate so far (this window's labels included); the FM's labels never reach it there. Trusted
    windows and the floor's windows have no such term."""
    from exfm_ray.students.losses import bce

    spec, rows = world
    b = rows.batch(0, 64, spec.tenant("feed").features, spec.tenant("feed").dense)
    y = b.label
    wrong = dataclasses.replace(b, fm_logit=torch.where(y > 0, -4.0, 4.0), fm_mask=torch.ones_like(y, dtype=torch.bool))
    distill = variant(f"{DEFAULT_VARIANT}@fm_gate_young_aux=0,w=2,fm_gate_young_prior=0.5")  # the serving head's part
    assert variant(DEFAULT_VARIANT).fm_gate_young_prior == 1 and variant("kd_single_head").fm_gate_young_prior == 0
    assert variant(DEFAULT_VARIANT).fm_gate_young_prior_when == "student_behind"
    before = torch.zeros_like(y)  # an earlier window without positives: the rate is the tenant's, not this window's
    grads = []
    for by_hand in (False, True):
        torch.manual_seed(0)
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
        learner.begin_window(before, wrong.fm_logit, wrong.fm_mask)
        learner.begin_window(y, wrong.fm_logit, wrong.fm_mask)
        assert not learner.fm_trusted and len(learner.fm_record) == 2
        m = learner.model
        if by_hand:
            s = m(b.sparse, b.dense, b.history).s
            rate = (float(y.sum()) + 0.5) / (2 * len(y) + 1)
            (bce(s, y).mean() + 2 * 0.5 * bce(s, torch.full_like(s, rate)).mean()).backward()
        else:
            parts = learner.step(wrong)
            assert parts["young_prior"] > 0 and "kd" not in parts and parts["total"] > parts["serving"]
        grads.append(m.serving_head.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-7)
    learner.begin_window(y, wrong.fm_logit, wrong.fm_mask)  # 3 windows of record: the floor's FM term, no constant
    assert "young_prior" not in learner.step(wrong)
    learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
    learner.begin_window(y, -wrong.fm_logit, wrong.fm_mask)  # an FM that beats the constant: trusted
    assert learner.fm_trusted
    assert "young_prior" not in learner.step(dataclasses.replace(wrong, fm_logit=-wrong.fm_logit))


def test_the_constant_teaches_only_a_student_that_does_not_beat_it(world):
    """fm_gate_young_prior_when='student_behind': the constant goes on the serving head only while the student's
    own scores of its windows (before training on them, as `judge` sees them) do not beat it by log loss; a
    student that ranks already would only be compressed towards the mean."""
    spec, rows = world
    b = rows.batch(0, 64, spec.tenant("feed").features, spec.tenant("feed").dense)
    y = b.label
    wrong = dataclasses.replace(b, fm_logit=torch.where(y > 0, -4.0, 4.0), fm_mask=torch.ones_like(y, dtype=torch.bool))
    good, flat = torch.where(y > 0, 0.9, 0.05), torch.full_like(y, 0.5)  # beats the constant; loses to it
    prior = {}
    for when in ("student_behind", "always"):
        distill = variant(f"{DEFAULT_VARIANT}@fm_gate_young_prior=1,fm_gate_young_prior_when={when}")
        for name, scores in (("good", good), ("flat", flat)):
            learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
            learner.begin_window(y, wrong.fm_logit, wrong.fm_mask)
            learner.judge(scores)
            assert not learner.fm_trusted
            prior[(when, name)] = "young_prior" in learner.step(wrong)
    assert prior == {
        ("student_behind", "good"): False, ("student_behind", "flat"): True,
        ("always", "good"): True, ("always", "flat"): True,
    }  # fmt: skip
    # pooled over the student's last 3 windows: a good window outweighs two a little worse than the constant,
    # and drops out after 3 more
    distill = variant(f"{DEFAULT_VARIANT}@fm_gate_young_prior=1")
    learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
    behind, worse = [], torch.full_like(y, 1.5 * float(y.mean()))
    for scores in (good, worse, worse, worse):
        learner.begin_window(y, wrong.fm_logit, wrong.fm_mask)
        learner.judge(scores)
        learner.judge(good)  # judged once per window: a second call records nothing
        behind.append(learner.student_behind())
    assert behind == [False, False, False, True] and len(learner.student_record) == 3


def test_a_young_head_learns_the_young_fms_ranking_recalibrated(world):
    """fm_gate_young_target='calibrated': the young head learns sigmoid(a * f + b), (a, b) a Platt fit of the FM's
    logits on the labels of the windows so far (shrunk by fm_calibrate_prior), not the overconfident label the gate
    distrusted; fitted only while the FM is young, and refitted alike after a resume."""
    from exfm_ray.students.calibration import platt_fit
    from exfm_ray.students.losses import bce

    spec, rows = world
    b = rows.batch(0, 64, spec.tenant("feed").features, spec.tenant("feed").dense)
    y = b.label
    f = torch.where(y > 0, 5.0, 2.0) + 0.5 * torch.randn(len(y), generator=torch.Generator().manual_seed(0))
    batch = dataclasses.replace(b, fm_logit=f, fm_mask=torch.ones_like(y, dtype=torch.bool))  # ranks, overconfident
    distill = variant(f"{DEFAULT_VARIANT}@fm_gate_young_prior=0")  # kd_sa's young head: 0.5, recalibrated
    a, shift = platt_fit(y, f, distill.fm_calibrate_prior)
    target = torch.sigmoid(a * f + shift)
    assert bce(torch.logit(target), y).mean() < bce(f, y).mean()  # the fit mends the calibration
    grads = []
    # the same target whatever else recalibrates the FM (fm_calibrate: the serving side's, applied once) and
    # whichever gate judges it (against the student: judged later, in `judge`)
    for knobs, by_hand in (("", False), ("", True), (",fm_calibrate=true", False), (",fm_gate_against=student", None)):
        torch.manual_seed(0)
        d = variant(f"{DEFAULT_VARIANT}@fm_gate_young_prior=0{knobs}")
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), d), StudentConfig(), d)
        learner.begin_window(y, f, batch.fm_mask)
        assert learner.young_affine == (a, shift), knobs
        if by_hand is None:
            continue
        assert not learner.fm_trusted
        m = learner.model
        if by_hand:
            out = m(b.sparse, b.dense, b.history)
            (bce(out.s, y).mean() + distill.w * 0.5 * bce(out.young, target).mean()).backward()
        else:
            assert learner.step(batch)["young_aux"] > 0
        grads.append(m.aux_young.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-7) and torch.allclose(grads[2], grads[1], atol=1e-7)
    learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
    learner.begin_window(y, f, batch.fm_mask)
    resumed = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
    resumed.load_state_dict(learner.state_dict())
    for x in (learner, resumed):  # the second young window: a fit on both windows' rows, the same after a resume
        x.begin_window(y, 1.5 * f, batch.fm_mask)
    both = platt_fit(y.repeat(2), torch.cat([f, 1.5 * f]), distill.fm_calibrate_prior)
    assert resumed.young_affine == learner.young_affine == both
    learner.begin_window(y, f, batch.fm_mask)  # 3 windows of record: no young head, no more fits, no rows kept
    assert learner.fm_rows == [] and learner.young_affine == (1.0, 0.0)
    ungated = variant(f"{DEFAULT_VARIANT}@fm_gate=false")  # no gate, no young head: nothing to fit
    learner = StudentLearner(build_student(spec, "feed", StudentConfig(), ungated), StudentConfig(), ungated)
    learner.begin_window(y, f, batch.fm_mask)
    assert learner.young_affine == (1.0, 0.0) and learner.fm_rows == []
