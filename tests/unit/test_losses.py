"""Gradient flow of the ExFM losses: who learns from what (exfm-method.md sections 5-7)."""

import pytest
import torch

from exfm_ray.students.config import DistillConfig, StudentConfig, variant
from exfm_ray.students.learner import StudentLearner
from exfm_ray.students.losses import (
    adapter_loss,
    aux_fm_loss,
    bce,
    fm_target,
    grad_scale,
    masked_mean,
    single_head_kd_loss,
    student_loss,
)
from exfm_ray.students.model import build_student

pytestmark = pytest.mark.unit


def _batch(world, tenant="feed"):
    spec, rows = world
    t = spec.tenant(tenant)
    return rows.batch(0, 64, t.features, t.dense)


def _grads(module):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}


def _nonzero(g):
    return g is not None and bool(g.abs().sum() > 0)


def test_grad_scale_is_identity_forward_and_scales_backward():
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_scale(x, 3.0)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 3.0))


def test_masked_mean_norms():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = torch.tensor([True, False, True, False])
    assert masked_mean(v, m, "mask").item() == pytest.approx(2.0)
    assert masked_mean(v, m, "batch").item() == pytest.approx(1.0)
    assert masked_mean(v, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_fm_target_label_scaling_is_clamped_and_constant():
    f = torch.tensor([-4.0, 0.0, 4.0], requires_grad=True)
    t = fm_target(f, 3.0)
    assert not t.requires_grad
    assert torch.allclose(t, torch.clamp(3 * torch.sigmoid(f.detach()), max=1.0))
    assert t[2].item() == 1.0


def test_serving_head_gets_no_gradient_from_distillation(world):
    spec, _ = world
    distill = variant("ah")
    student = build_student(spec, "feed", StudentConfig(), distill)
    b = _batch(world)
    out = student(b.sparse, b.dense)
    aux_fm_loss(out.d, b.fm_logit, b.fm_mask, distill).backward()
    grads = _grads(student)
    assert all(g is None or not _nonzero(g) for n, g in grads.items() if n.startswith("serving_head"))
    assert _nonzero(grads["aux_fm.weight"])
    # ... but the FM knowledge does reach the shared backbone
    assert any(_nonzero(g) for n, g in grads.items() if n.startswith("backbone"))


def test_aux_heads_get_no_gradient_from_serving_loss(world):
    spec, _ = world
    distill = variant("ah_sa")
    student = build_student(spec, "feed", StudentConfig(), distill)
    b = _batch(world)
    out = student(b.sparse, b.dense)
    bce(out.s, b.label).mean().backward()
    grads = _grads(student)
    assert _nonzero(grads["serving_head.weight"])
    for n, g in grads.items():
        if n.startswith(("aux_fm", "aux_sa", "adapter")):
            assert not _nonzero(g), n


def test_adapter_gets_no_gradient_from_student_loss(world):
    spec, _ = world
    distill = variant("ah_sa")
    student = build_student(spec, "feed", StudentConfig(), distill)
    b = _batch(world)
    t_sa = torch.sigmoid(student.adapter(b.fm_logit))  # target NOT detached here on purpose
    out = student(b.sparse, b.dense)
    loss, parts = student_loss(out.s, out.d, out.d2, b.label, b.fm_logit, b.fm_mask, t_sa, distill)
    loss.backward()
    assert set(parts) == {"serving", "aux_fm", "aux_sa"}
    assert all(not _nonzero(p.grad) for p in student.adapter.parameters())
    assert _nonzero(student.aux_sa.weight.grad)


def test_adapter_learns_only_from_true_labels(world):
    spec, _ = world
    distill = variant("ah_sa")
    student = build_student(spec, "feed", StudentConfig(), distill)
    b = _batch(world)
    adapter_loss(student.adapter(b.fm_logit), b.label, b.fm_mask, distill).backward()
    grads = _grads(student)
    assert _nonzero(grads["adapter.net.2.weight"])  # the zero-initialized output layer learns first
    assert all(not _nonzero(g) for n, g in grads.items() if not n.startswith("adapter"))


def test_beta_scales_only_the_aux_gradient_into_the_backbone(world):
    spec, _ = world
    b = _batch(world)
    grads = {}
    for beta in (1.0, 2.5):
        torch.manual_seed(0)
        distill = DistillConfig(mode="aux_head", adapter=False, beta=beta)
        student = build_student(spec, "feed", StudentConfig(), distill)
        out = student(b.sparse, b.dense)
        aux_fm_loss(out.d, b.fm_logit, b.fm_mask, distill).backward()
        grads[beta] = _grads(student)
    for n in grads[1.0]:
        if n.startswith("backbone"):
            assert torch.allclose(grads[2.5][n], 2.5 * grads[1.0][n], atol=1e-6), n
        if n.startswith("aux_fm"):
            assert torch.allclose(grads[2.5][n], grads[1.0][n], atol=1e-6), n


def test_masked_rows_contribute_nothing_to_distillation(world):
    spec, _ = world
    distill = variant("kd_single_head")
    student = build_student(spec, "feed", StudentConfig(), distill)
    b = _batch(world)
    out = student(b.sparse, b.dense)
    a = single_head_kd_loss(out.s, b.fm_logit, b.fm_mask, distill)
    changed = torch.where(b.fm_mask, b.fm_logit, b.fm_logit + 100.0)
    assert single_head_kd_loss(out.s, changed, b.fm_mask, distill).item() == pytest.approx(a.item())


def test_vm_only_ignores_fm_columns(world):
    spec, _ = world
    distill = variant("vm_only")
    student = build_student(spec, "feed", StudentConfig(), distill)
    assert student.aux_fm is None and student.adapter is None
    b = _batch(world)
    out = student(b.sparse, b.dense)
    loss, parts = student_loss(out.s, out.d, out.d2, b.label, b.fm_logit, b.fm_mask, None, distill)
    assert set(parts) == {"serving"}
    assert loss.item() == pytest.approx(bce(out.s, b.label).mean().item())


def test_shared_sa_head_has_no_second_head(world):
    spec, _ = world
    distill = variant("ah_sa", sa_head="shared")
    student = build_student(spec, "feed", StudentConfig(), distill)
    assert student.aux_sa is None
    b = _batch(world)
    out = student(b.sparse, b.dense)
    assert torch.equal(out.d, out.d2)


def test_adapter_starts_as_the_identity_on_the_fm_logit():
    from exfm_ray.students.model import StudentAdapter

    f = torch.linspace(-5, 5, 11)
    for use_logit in (True, False):
        assert torch.equal(StudentAdapter(8, use_logit)(f), f)


def _vm_step_inputs(world, distill):
    """A learner, its batch, and the serving/aux logits the VM step will see (the model before it)."""
    import copy

    spec, _ = world
    torch.manual_seed(0)
    learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
    b = _batch(world)
    before = copy.deepcopy(learner.model)
    with torch.no_grad():
        out = before(b.sparse, b.dense)
    return learner, b, before, out


@pytest.mark.parametrize("order", ["before", "after"])
def test_algorithm1_target_comes_from_the_adapter_updated_on_the_batch_or_not(world, order):
    learner, b, before, out = _vm_step_inputs(world, variant("ah_sa", sa_order=order))
    parts = learner.step(b)
    updated = learner.model.adapter  # the VM step never touches the adapter
    assert not torch.equal(updated.net[2].weight, before.adapter.net[2].weight)
    with torch.no_grad():
        target = torch.sigmoid((updated if order == "before" else before.adapter)(b.fm_logit))
        other = torch.sigmoid((before.adapter if order == "before" else updated)(b.fm_logit))
        expected = masked_mean(bce(out.d2, target), b.fm_mask).item()
        wrong = masked_mean(bce(out.d2, other), b.fm_mask).item()
    assert parts["aux_sa"] == pytest.approx(expected, rel=1e-5)
    assert abs(parts["aux_sa"] - wrong) > 1e-6  # the two orders are told apart


def test_w_scales_the_fm_term(world):
    b = _batch(world)
    totals = {}
    for w in (1.0, 3.0):
        learner, b, _, out = _vm_step_inputs(world, variant("ah", w=w))
        parts = learner.step(b)
        totals[w] = parts["total"] - parts["serving"]
        assert totals[w] == pytest.approx(w * parts["aux_fm"], rel=1e-5)
    assert totals[3.0] == pytest.approx(3 * totals[1.0], rel=1e-5)


def test_kd_sa_distills_the_adapted_label_on_the_serving_head(world):
    learner, b, before, out = _vm_step_inputs(world, variant("kd_sa"))
    assert learner.model.aux_fm is None and learner.model.aux_sa is None and learner.model.adapter is not None
    parts = learner.step(b)
    assert set(parts) == {"adapter", "serving", "kd", "total"}
    with torch.no_grad():
        target = torch.sigmoid(learner.model.adapter(b.fm_logit))
    assert parts["kd"] == pytest.approx(masked_mean(bce(out.s, target), b.fm_mask).item(), rel=1e-5)
    raw = masked_mean(bce(out.s, torch.sigmoid(b.fm_logit)), b.fm_mask).item()
    assert abs(parts["kd"] - raw) > 1e-6  # not the raw FM label


def test_adapter_starts_at_the_gap_between_labels_and_the_fm(world):
    spec, rows = world
    y = (torch.arange(rows.num_rows) % 10 == 0).float()  # 10% positives
    f = torch.full((rows.num_rows,), 1.0)  # the FM says 73%: far too high
    mask = torch.ones(rows.num_rows, dtype=torch.bool)
    for start in (True, False):
        distill = variant("kd_sa", sa_start=start, sa_start_prior=0.0)
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
        learner.begin_window(y, f, torch.zeros_like(mask))  # no FM label yet: the adapter waits
        assert torch.equal(learner.model.adapter(f), f)
        learner.begin_window(y, f, mask)
        adapted = torch.sigmoid(learner.model.adapter(f)).mean().item()
        assert adapted == (pytest.approx(float(y.mean()), abs=0.005) if start else pytest.approx(0.731, abs=0.001))
        serving = torch.sigmoid(learner.model.serving_head.bias).item()
        assert serving == pytest.approx(float(y.mean()), abs=0.005)  # heads start at the base rate


def test_variant_names_carry_their_own_knobs():
    from exfm_ray.errors import ConfigError
    from exfm_ray.students.config import split_variant

    assert split_variant("ah_sa@w=2,beta=0.5") == ("ah_sa", {"w": "2", "beta": "0.5"})
    d = variant("ah_sa@w=2,beta=0.5", w=1.0, alpha=3.0)
    assert (d.w, d.beta, d.alpha, d.mode) == (2.0, 0.5, 3.0, "aux_head")
    with pytest.raises(ConfigError, match="zz"):
        variant("ah_sa@zz=1")
    with pytest.raises(ConfigError, match="knob=value"):
        variant("ah_sa@w")
    # a list on the command line: a part with '=' and no '@' is one more knob of the variant before it
    from exfm_ray.students.config import split_variants

    assert split_variants(" vm_only,ah_sa@w=2, beta=0.5,kd_sa,kd_sa@fm_gate_z=2,") == [
        "vm_only", "ah_sa@w=2,beta=0.5", "kd_sa", "kd_sa@fm_gate_z=2"
    ]  # fmt: skip


def test_adapter_start_is_shrunk_when_positives_are_few(world):
    spec, rows = world
    n = rows.num_rows
    f = torch.full((n,), 1.0)
    mask = torch.ones(n, dtype=torch.bool)
    offsets = {}
    for positives in (2, 200):
        y = torch.zeros(n)
        y[:positives] = 1.0
        distill = variant("kd_sa", sa_start=True, sa_start_prior=20.0)
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
        learner.begin_window(y, f, mask)
        offsets[positives] = float(learner.model.adapter(f)[0] - f[0])
    from exfm_ray.priors import base_rate, prior_logit

    for positives, offset in offsets.items():
        y = torch.zeros(n)
        y[:positives] = 1.0
        gap = prior_logit(base_rate(y)) - 1.0
        assert offset == pytest.approx(gap * positives / (positives + 20), rel=1e-4)
