"""The order of one StudentLearner step (Algorithm 1) and the weight w of the FM term: tests
written so that a swapped order or an ignored / misplaced w fails them."""

import copy

import pytest
import torch

import exfm_ray.students.learner as learner_module
from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.students.config import StudentConfig, variant
from exfm_ray.students.learner import StudentLearner
from exfm_ray.students.losses import fm_target, student_loss
from exfm_ray.students.model import build_student

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def world():
    stream = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=400, num_tenants=2)).stream()
    rows = WindowTensors(stream.tenant_rows(1, "feed"), stream.spec)
    rows.set_fm(torch.randn(rows.num_rows), torch.rand(rows.num_rows) > 0.3)
    t = stream.spec.tenant("feed")
    return stream.spec, rows.batch(0, 64, t.features, t.dense)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("name", ["ah_sa", "kd_sa"])
def test_algorithm1_step_order_sa_step_then_adapted_target_then_vm_step(world, monkeypatch, name):
    """(1) one adapter step on the batch's labels, (2) the adapted target from the updated adapter,
    (3) one VM step: recorded at the seams in the order they happen, with what each one saw."""
    spec, b = world
    distill = variant(name, fm_gate=False)
    torch.manual_seed(0)
    events: list[str] = []
    seen: dict = {}

    def sync(params):
        events.append("sync_adapter" if params is learner.adapter_params else "sync_vm")
        head = learner.model.aux_young  # the young FM's head idles while the FM is trusted
        idle = {id(p) for p in head.parameters()} if head is not None else set()
        assert all(p.grad is not None for p in params if id(p) not in idle)  # between a backward and its step

    learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill, sync)
    initial = _snapshot(learner.model)

    def spy(tag, fn):
        def wrapped(*args, **kwargs):
            events.append(tag)
            seen[tag] = (_snapshot(learner.model), args)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(learner_module, "adapter_loss", spy("adapter_loss", learner_module.adapter_loss))
    monkeypatch.setattr(learner_module, "student_loss", spy("student_loss", learner_module.student_loss))
    learner.sa_opt.step = spy("sa_step", learner.sa_opt.step)
    learner.vm_opt.step = spy("vm_step", learner.vm_opt.step)

    learner.step(b)
    assert events == ["adapter_loss", "sync_adapter", "sa_step", "student_loss", "sync_vm", "vm_step"]
    final = _snapshot(learner.model)
    adapter = [n for n in final if n.startswith("adapter.")]
    vm = [n for n in final if not n.startswith("adapter.")]
    # the adapter learned before the VM loss was built; the VM had not moved when the adapter learned
    at_vm_loss, vm_args = seen["student_loss"]
    assert all(torch.equal(at_vm_loss[n], final[n]) for n in adapter)
    assert any(not torch.equal(initial[n], final[n]) for n in adapter)
    at_sa_loss, _ = seen["adapter_loss"]
    assert all(torch.equal(at_sa_loss[n], initial[n]) for n in vm)
    assert any(not torch.equal(initial[n], final[n]) for n in vm)
    # the VM's target is the updated adapter's label of this batch, not the one before its step
    t_sa = vm_args[6]
    before = copy.deepcopy(learner.model.adapter)
    before.load_state_dict({n.removeprefix("adapter."): initial[n] for n in adapter})
    with torch.no_grad():
        assert torch.allclose(t_sa, torch.sigmoid(learner.model.adapter(b.fm_logit)))
        assert not torch.allclose(t_sa, torch.sigmoid(before(b.fm_logit)))


def _logit_grads(name: str, w: float, b, t_sa: torch.Tensor | None):
    """Random serving / FM-aux / SA-aux logits and d loss / d logit of the VM objective at weight w."""
    g = torch.Generator().manual_seed(1)
    logits = {k: torch.randn(len(b.label), generator=g).requires_grad_() for k in ("s", "d", "d2")}
    loss, _ = student_loss(*logits.values(), b.label, b.fm_logit, b.fm_mask, t_sa, variant(name, w=w))
    loss.backward()
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in logits.items()}
    return {k: torch.sigmoid(v.detach()) for k, v in logits.items()}, grads


@pytest.mark.parametrize("name", ["kd_sa", "kd_single_head", "ah", "ah_sa"])
def test_w_scales_exactly_the_fm_term(world, name):
    """Each head's logit gradient in closed form: the serving BCE on the labels, plus w times the
    FM term on the head that learns the FM (the serving head for KD, the FM aux head for AH);
    the adapted-label aux head keeps its own weight w_sa."""
    _, b = world
    cfg = variant(name)
    t_sa = torch.sigmoid(torch.randn(len(b.label), generator=torch.Generator().manual_seed(2))) if cfg.adapter else None
    m = b.fm_mask.float() / b.fm_mask.sum()
    zero = torch.zeros(len(b.label))
    for w in (0.0, 0.5, 3.0):
        p, got = _logit_grads(name, w, b, t_sa)
        serving = (p["s"] - b.label) / len(b.label)
        if cfg.mode == "single_head":
            fm_term = (p["s"] - (t_sa if t_sa is not None else fm_target(b.fm_logit, cfg.alpha))) * m
            expected = {"s": serving + w * fm_term, "d": zero, "d2": zero}
        else:
            fm_term = (p["d"] - fm_target(b.fm_logit, cfg.alpha)) * m
            sa_term = (p["d2"] - t_sa) * m if t_sa is not None else zero
            expected = {"s": serving, "d": w * fm_term, "d2": cfg.w_sa * sa_term}
        assert fm_term.abs().sum() > 0
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=f"{name} w={w}: gradient of {k}")


def test_the_learner_passes_w_on_to_its_loss(world):
    """The default variant through the learner: the reported loss is serving + w * kd."""
    spec, b = world
    for w in (0.5, 3.0):
        distill = variant("kd_sa", w=w, fm_gate=False)
        torch.manual_seed(0)
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
        parts = learner.step(b)
        assert parts["kd"] > 0
        assert parts["total"] == pytest.approx(parts["serving"] + w * parts["kd"], rel=1e-5)


@pytest.mark.parametrize("name", ["vm_only", "kd_single_head", "ah", "ah_sa", "kd_sa", "kd_sa@fm_calibrate=fallback"])
def test_learner_state_is_plain_data_that_loads_weights_only(world, name):
    """Checkpoints resume with torch.load(weights_only=True): tensors, numbers, strings, lists, dicts."""
    import io

    spec, b = world
    distill = variant(name)
    learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
    learner.begin_window(b.label, b.fm_logit, b.fm_mask)
    learner.judge(torch.full_like(b.label, 0.5))
    learner.step(b)
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    resumed = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert len(learner.student_record) == 1
    for key in ("seen", "fm_affine", "fm_trusted", "fm_record", "student_record"):
        assert getattr(resumed, key) == getattr(learner, key), key
    old = {k: v for k, v in learner.state_dict().items() if k != "student_record"}  # a checkpoint from before it
    resumed.load_state_dict(old)
    assert resumed.student_record == []
    # rows kept for a Platt fit: fm_calibrate's, and kd_sa's young head's (recalibrated)
    assert len(resumed.fm_rows) == len(learner.fm_rows) == (1 if "fm_calibrate" in name or name == "kd_sa" else 0)
    with torch.no_grad():
        torch.testing.assert_close(resumed.predict(b), learner.predict(b))
