"""Gradient flow of the ExFM losses: who learns from what (exfm-method.md sections 5-7)."""

import pytest
import torch

from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
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


@pytest.fixture(scope="module")
def world():
    gen = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=400, num_tenants=2))
    stream = gen.stream()
    rows = WindowTensors(stream.tenant_rows(1, "feed"), stream.spec)
    rows.set_fm(torch.randn(rows.num_rows), torch.rand(rows.num_rows) > 0.3)
    return stream.spec, rows


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


def test_algorithm1_step_updates_adapter_first_then_student(world):
    spec, _ = world
    distill = variant("ah_sa")
    torch.manual_seed(0)
    learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    parts = learner.step(_batch(world))
    assert {"adapter", "serving", "aux_fm", "aux_sa", "total"} <= set(parts)
    after = dict(learner.model.named_parameters())
    for name in ("adapter.net.2.weight", "serving_head.weight", "aux_sa.weight", "aux_fm.weight"):
        assert not torch.equal(before[name], after[name]), name


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
