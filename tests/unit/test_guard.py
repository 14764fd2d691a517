"""The do-no-harm guard: its rule, the tenant loop publishing its choice, the experiment's view."""

import math

import numpy as np
import pytest
import torch

from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.experiment.guarded import base_rate_records, guarded_records, worst_excess
from exfm_ray.fm.config import FMConfig
from exfm_ray.metrics import evaluate, ne
from exfm_ray.students.guard import decide, pooled_ne, trailing_base_rate
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.run import TenantRun

pytestmark = pytest.mark.unit


def _rec(window, rows, positives, exfm, control, base_rate):
    return {"window": window, "rows": rows, "positives": positives, "log_loss": exfm,
            "control_log_loss": control, "base_rate_log_loss": base_rate}  # fmt: skip


def test_pooled_ne_is_the_ne_of_the_rows_taken_together():
    rng = np.random.default_rng(0)
    ys = [rng.random(n) < 0.1 for n in (500, 800)]
    ps = [np.clip(rng.random(n) * 0.3, 0.01, 0.99) for n in (500, 800)]
    recs = [{"window": i, **evaluate(y.astype(float), p)} for i, (y, p) in enumerate(zip(ys, ps, strict=True))]
    together = ne(np.concatenate(ys).astype(float), np.concatenate(ps))
    assert pooled_ne(recs, "log_loss") == pytest.approx(together, rel=1e-6)
    assert math.isnan(pooled_ne([{**recs[0], "positives": 0}], "log_loss"))


def test_the_guard_serves_the_lowest_trailing_ne_and_says_why():
    exfm_worse = [_rec(t, 1000, 100, 0.34, 0.30, 0.33) for t in range(4)]
    d = decide(exfm_worse, trailing=3)
    assert d.serve == "control" and d.windows == (1, 3)
    assert "windows 1-3" in d.reason and "control" in d.reason.split("(")[1].split(",")[0]
    assert decide([_rec(0, 1000, 100, 0.30, 0.31, 0.33)], 3).serve == "exfm"
    both_bad = [_rec(t, 1000, 100, 0.36, 0.35, 0.325) for t in range(3)]
    assert decide(both_bad, 3).serve == "base_rate"
    # the constant must win clearly: by less than the margin, the better student keeps serving
    near = [_rec(t, 1000, 100, 0.3265, 0.33, 0.325) for t in range(3)]
    assert decide(near, 3).serve == "exfm"
    by_1_5_pct = [_rec(t, 1000, 100, 0.330, 0.34, 0.325) for t in range(3)]
    assert decide(by_1_5_pct, 3).serve == "exfm"
    by_2_5_pct = [_rec(t, 1000, 100, 0.3335, 0.34, 0.325) for t in range(3)]
    assert decide(by_2_5_pct, 3).serve == "base_rate"
    tie = [_rec(0, 1000, 100, 0.30, 0.30, 0.33)]
    assert decide(tie, 3).serve == "exfm"  # ties go to the ExFM student
    # only the trailing windows count: an old bad window is forgotten
    recovering = [_rec(0, 1000, 100, 0.60, 0.30, 0.33)] + [_rec(t, 1000, 100, 0.29, 0.30, 0.33) for t in (1, 2, 3)]
    assert decide(recovering, 3).serve == "exfm" and decide(recovering, 4).serve == "control"
    assert decide([], 3).serve == "exfm"


def test_trailing_base_rate():
    hist = [{"window": 0, "rows": 100, "positives": 1}, {"window": 1, "rows": 300, "positives": 9}]
    assert trailing_base_rate(hist, 1) == pytest.approx(9.5 / 301)
    assert trailing_base_rate(hist, 3) == pytest.approx(10.5 / 401)
    assert trailing_base_rate([], 3) is None


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    stream = SyntheticStream(SyntheticConfig(num_windows=4, rows_per_window=1500, num_tenants=2)).stream()
    stream.write(root / "stream")
    augment_stream_locally(stream, root, FMConfig(size=1))
    return AugmentedStore(root)


def _walk(store, **tenant) -> TenantRun:
    torch.set_num_threads(1)
    view = resolve(TenantConfig(name="feed", student={"batch_size": 64}, **tenant), store.spec())
    run = TenantRun(view)
    for t in range(4):
        run.window(t, store.read_window(t, columns=view.columns))
    return run


def test_a_guarded_run_records_what_served_each_window_and_publishes_the_choice(augmented):
    run = _walk(augmented)
    assert run.control is not None  # the guard trains the twin without being asked
    h = run.history
    assert h[0]["served"] == "exfm" and h[0]["base_rate_ne"] == pytest.approx(1.0, abs=0.01)
    assert h[0]["ne"] < 1.3  # a fresh student starts near the base rate (random heads: NE ~2 at 10%)
    for prev, cur in zip(h, h[1:], strict=False):
        assert cur["served"] == prev["guard_choice"]
        assert (
            cur["served_ne"] == cur[{"exfm": "ne", "control": "control_ne", "base_rate": "base_rate_ne"}[cur["served"]]]
        )
        expected = decide(h[: h.index(prev) + 1], 3)
        assert prev["guard_choice"] == expected.serve and prev["guard_reason"] == expected.reason
    # the published model is the chosen one
    for choice, learner in (("exfm", run.learner), ("control", run.control)):
        run.history[-1]["guard_choice"] = choice
        torch.testing.assert_close(
            run.served_model().serving_head.weight, learner.model.serving_model().serving_head.weight
        )
    run.history[-1]["guard_choice"] = "base_rate"
    batch = next(iter(run.view and _batches(run, augmented)))
    p = run.served_model()(batch.sparse, batch.dense)
    assert torch.allclose(p, torch.full_like(p, trailing_base_rate(run.history, 3)), atol=1e-6)


def _batches(run, store):
    from exfm_ray.data.batching import WindowTensors

    rows = WindowTensors(run.view.select(store.read_window(3, columns=run.view.columns)), run.view.spec)
    return rows.batches(32, run.features, run.dense)


def test_the_guard_can_be_turned_off(augmented):
    run = _walk(augmented, guard=False)
    assert run.control is None
    assert {r["guard_choice"] for r in run.history} == {"exfm"}
    assert all(r["guard_reason"] == "guard off" for r in run.history)


def _records(ne_by_variant: dict[str, list[float]]) -> list[dict]:
    out = []
    for v, values in ne_by_variant.items():
        for t, x in enumerate(values):
            out.append({"seed": 0, "variant": v, "tenant": "a", "window": t, "ne": x, "log_loss": x * 0.325,
                        "rows": 1000, "positives": 100})  # fmt: skip
    return out


def test_experiment_guard_follows_the_same_rule():
    recs = _records({"ah_sa": [1.0, 0.9, 1.2, 1.2, 1.2], "vm_only": [1.0, 0.95, 0.95, 0.95, 0.95]})
    labels = {("a", t): (np.arange(1000) < 100).astype(float) for t in range(5)}
    flat = base_rate_records(recs, labels, trailing=3)
    assert {r["window"] for r in flat} == set(range(5)) and flat[0]["ne"] == pytest.approx(1.0, abs=1e-3)
    guarded = guarded_records(recs + flat, "ah_sa", trailing=1)
    assert [r["served"] for r in guarded] == ["exfm", "exfm", "exfm", "control", "control"]
    assert [r["ne"] for r in guarded] == [1.0, 0.9, 1.2, 0.95, 0.95]
    # windows 2-4 are the worst span: served 1.2, 0.95, 0.95 against the control's 0.95 x 3
    assert worst_excess(recs + guarded, "ah_sa+guard", "vm_only", span=3, warmup=0) == pytest.approx(
        100 * ((1.2 + 0.95 + 0.95) / (0.95 * 3) - 1), rel=1e-6
    )


def test_the_blend_serves_where_it_scores_best_and_ties_go_to_the_exfm_student():
    def rec(t, exfm, blend, control):
        return {**_rec(t, 1000, 100, exfm, control, 0.33), "blend_log_loss": blend}

    assert decide([rec(t, 0.31, 0.30, 0.305) for t in range(3)], 3).serve == "blend"
    assert decide([rec(t, 0.30, 0.30, 0.30) for t in range(3)], 3).serve == "exfm"
    assert decide([rec(t, 0.31, 0.305, 0.305) for t in range(3)], 3).serve == "blend"  # before the control
    assert decide([rec(t, 0.36, 0.35, 0.36) for t in range(3)], 3).serve == "base_rate"


def test_a_guarded_run_scores_and_publishes_the_blend(augmented):
    run = _walk(augmented)
    rows = [r for r in run.history if "blend_log_loss" in r]
    assert len(rows) == 4
    for r in rows:  # the mean of two probabilities never loses to the worse of them (convexity)
        assert r["blend_log_loss"] <= max(r["log_loss"], r["control_log_loss"]) + 1e-9
    run.history[-1]["guard_choice"] = "blend"
    batch = next(iter(_batches(run, augmented)))
    a = run.learner.model.serving_model()(batch.sparse, batch.dense)
    b = run.control.model.serving_model()(batch.sparse, batch.dense)
    torch.testing.assert_close(run.served_model()(batch.sparse, batch.dense), 0.5 * (a + b))


def test_experiment_guard_serves_the_blend_record():
    recs = _records({"kd_sa": [1.0, 1.0, 1.0, 1.0], "vm_only": [1.0, 1.0, 1.0, 1.0], "blend": [0.9, 0.9, 0.9, 0.9]})
    labels = {("a", t): (np.arange(1000) < 100).astype(float) for t in range(4)}
    guarded = guarded_records(recs + base_rate_records(recs, labels, trailing=3), "kd_sa", trailing=3)
    assert [r["served"] for r in guarded] == ["exfm", "blend", "blend", "blend"]
    assert [r["ne"] for r in guarded] == [1.0, 0.9, 0.9, 0.9]
