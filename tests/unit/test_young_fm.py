"""Judging the young FM across tenants (fm_gate_young_z; exfm_ray/students/young_fm.py): the evidence, the pooled
verdict, a learner judged off, and the experiment's verdict per seed."""

import dataclasses

import pytest
import torch

from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.experiment.config import ExperimentConfig
from exfm_ray.experiment.runner import run_experiment
from exfm_ray.students.config import DEFAULT_VARIANT, StudentConfig, variant
from exfm_ray.students.learner import StudentLearner
from exfm_ray.students.model import build_student
from exfm_ray.students.young_fm import RankEvidence, YoungVerdict, auc_variance, rank_evidence, young_verdict

pytestmark = pytest.mark.unit


def test_pooled_over_tenants_gaps_too_thin_alone_clear_the_bar_and_a_big_tenant_outweighs_a_small_one():
    # Hanley-McNeil at AUC 0.5, 10 positives, 10 negatives: (0.25 + 9 * (1/3 - 1/4) * 2) / 100
    assert auc_variance(0.5, 10, 10) == pytest.approx(0.0175)
    thin = RankEvidence(0.70, 0.62, 40, 2000)
    alone = young_verdict([thin], 2.0)
    assert 1.0 < alone.z < 2.0 and not alone.on  # one tenant's positives cannot tell
    pooled = young_verdict([thin] * 3, 2.0)
    assert pooled.on and pooled.tenants == 3 and pooled.z == pytest.approx(alone.z * 3**0.5)
    assert pooled.gap == pytest.approx(0.08)
    big = RankEvidence(0.60, 0.61, 2000, 100_000)  # the FM no better where the evidence is
    mixed = young_verdict([thin, thin, thin, big], 2.0)
    assert not mixed.on and abs(mixed.gap - (-0.01)) < abs(mixed.gap - 0.08)
    assert young_verdict([], -5.0) == YoungVerdict(0.0, 0.0, 0, False)  # no evidence, no benefit of the doubt
    # one positive ranked first by both: no certainty, so it does not drown the others
    assert young_verdict([thin] * 3 + [RankEvidence(1.0, 1.0, 1, 500)], 2.0).on


def test_evidence_is_the_fm_against_the_student_on_the_rows_the_fm_labeled():
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    fm = torch.tensor([2.0, -2.0, 1.0, -1.0, -3.0, 3.0])  # right on the first four rows, backwards on the last two
    student = torch.tensor([0.2, 0.8, 0.4, 0.6, 0.9, 0.1])  # backwards on the first four
    first_four = torch.tensor([True, True, True, True, False, False])
    e = rank_evidence(y, fm, student, first_four)
    assert (e.fm_auc, e.student_auc, e.positives, e.negatives) == (1.0, 0.0, 2, 2)
    assert rank_evidence(y, fm, student, torch.tensor([False, True, False, True, False, True])) is None  # no positive
    assert rank_evidence(y, fm, torch.full_like(student, float("nan")), first_four) is None  # a diverged student


def test_the_board_pools_active_tenants_current_posts_and_leaves_out_a_bad_one(tmp_path):
    from exfm_ray.tenants.config import TenantConfig
    from exfm_ray.tenants.registry import TenantRegistry
    from exfm_ray.tenants.young_board import BOARD_FILE, pooled, post, posted

    reg = TenantRegistry(tmp_path)
    evidence = {n: RankEvidence(0.7, 0.6 + i / 100, 40, 2000) for i, n in enumerate(("a", "b", "c", "d"))}
    for name, e in evidence.items():
        entry = reg.add(TenantConfig(name=name))
        post(reg, name, entry.run_name, 1, e)
    reg.remove("c")  # removed: its evidence no longer counts
    post(reg, "d", "d-g0", 1, evidence["d"])  # a post from an earlier registration
    assert posted(reg) == {"a": evidence["a"], "b": evidence["b"]}
    (reg.tenant_dir("b") / BOARD_FILE).write_text('{"run": "b-g1", "evidence": {"fm_auc": 0.7}}')  # unreadable
    assert posted(reg) == {"a": evidence["a"]} and pooled(reg) == {"a": evidence["a"]}


def test_a_run_waits_for_the_posts_of_tenants_other_runs_are_training_towards_the_window(tmp_path):
    import json

    from exfm_ray.tenants.config import TenantConfig
    from exfm_ray.tenants.registry import TenantRegistry
    from exfm_ray.tenants.young_board import awaited, post, wait_for_posts

    reg = TenantRegistry(tmp_path)
    names = ("here", "behind", "queued", "yielded", "held", "unread", "new", "finished", "past", "gone")
    runs = {n: reg.add(TenantConfig(name=n)).run_name for n in names}
    runs["alone"] = reg.add(TenantConfig(name="alone", variant="vm_only")).run_name  # never judges: never posts
    for name, window, phase in [("behind", 0, "train"), ("queued", 1, "queued"), ("yielded", 0, "done"),
                                ("held", 0, "pooling"), ("finished", 1, "done"), ("past", 3, "train"),
                                ("gone", 0, "train"), ("alone", 0, "train"), ("here", 0, "train")]:  # fmt: skip
        reg.progress_path(name).parent.mkdir(parents=True, exist_ok=True)
        reg.progress_path(name).write_text(json.dumps({"run": runs[name], "window": window, "phase": phase}))
    reg.progress_path("unread").parent.mkdir(parents=True, exist_ok=True)
    reg.progress_path("unread").write_text("[0]")  # not a progress record: skipped, not an error
    reg.remove("gone")
    # `here` is hosted by the waiting run and `held` by another run's wait (neither can move meanwhile), `new` has
    # no progress at all, `finished` trained window 1 already ("done": the last window trained). Where runs take
    # turns (following the stream), one queued for a slot or that gave its slot up before the window comes back.
    assert awaited(reg, 1, {"here"}) == ["behind", "queued", "yielded"]
    assert awaited(reg, 1, {"here"}, turns=False) == ["behind"]
    stop = lambda: True  # noqa: E731  asked to give up the slot: no wait
    assert wait_for_posts(reg, 1, {"here"}, 60.0, 0.25, turns=False, stop=stop) == ["behind"]
    slept = []

    def sleep(s):  # `behind` posts while the run waits
        slept.append(s)
        post(reg, "behind", runs["behind"], 1, RankEvidence(0.7, 0.6, 40, 2000))

    assert wait_for_posts(reg, 1, {"here"}, 60.0, 0.25, turns=False, sleep=sleep) == [] and slept == [0.25]
    assert awaited(reg, 1, {"here"}, turns=False) == []
    post(reg, "behind", "behind-g0", 1, RankEvidence(0.7, 0.6, 40, 2000))  # an earlier registration's post
    assert wait_for_posts(reg, 1, {"here"}, 0.0, 0.25, turns=False, sleep=sleep) == ["behind"]  # timed out
    assert slept == [0.25]


def test_a_run_gives_its_slot_up_unjudged_only_to_let_in_tenants_that_need_it(tmp_path):
    import json

    from exfm_ray.tenants.config import TenantConfig
    from exfm_ray.tenants.registry import TenantRegistry
    from exfm_ray.tenants.young_board import judge_later, post

    reg = TenantRegistry(tmp_path)
    runs = {n: reg.add(TenantConfig(name=n)).run_name for n in ("here", "behind", "queued")}
    for name, phase in [("behind", "train"), ("queued", "queued"), ("here", "pooling")]:
        reg.progress_path(name).parent.mkdir(parents=True, exist_ok=True)
        reg.progress_path(name).write_text(json.dumps({"run": runs[name], "window": 0, "phase": phase}))
    post(reg, "here", runs["here"], 1, RankEvidence(0.7, 0.6, 40, 2000))
    asked, not_asked = (lambda: True), (lambda: False)

    def behind_posts(_):
        post(reg, "behind", runs["behind"], 1, RankEvidence(0.7, 0.6, 40, 2000))

    def judge(wait_s, follow, asked_to_yield):
        return judge_later(reg, 1, {"here"}, wait_s, 0.01, follow, asked_to_yield, sleep=behind_posts)

    # following the stream (runs take turns): only when asked for the slot while tenants are still awaited
    assert judge(1e-9, True, asked) and not judge(1e-9, True, not_asked)
    assert not judge(0.0, True, asked)  # 0: never wait, judge now
    # without --follow: a run in training that timed out is not worth the slot; a queued tenant is
    assert not judge(1e-9, False, not_asked)
    assert judge(60.0, False, not_asked)  # `behind` posts while the run waits, `queued` is left: let it in
    post(reg, "queued", runs["queued"], 1, RankEvidence(0.7, 0.6, 40, 2000))
    assert not judge(60.0, False, not_asked) and not judge(60.0, True, asked)  # every post in: judge now


def test_a_student_judged_off_trains_as_without_the_young_fms_terms_and_keeps_its_verdict(world):
    spec, rows = world
    b = rows.batch(0, 64, spec.tenant("feed").features, spec.tenant("feed").dense)
    y, mask = b.label, torch.ones_like(b.label, dtype=torch.bool)
    wrong = dataclasses.replace(b, fm_logit=torch.where(y > 0, -4.0, 4.0), fm_mask=mask)  # distrusted, young
    learners = {}
    arms = (
        (DEFAULT_VARIANT, False),
        (DEFAULT_VARIANT, True),
        ("kd_sa@fm_gate_young_aux=0,fm_gate_young_prior=0", None),
    )
    for name, verdict in arms:
        distill = variant(name)
        torch.manual_seed(0)
        learner = StudentLearner(build_student(spec, "feed", StudentConfig(), distill), StudentConfig(), distill)
        learner.begin_window(y, wrong.fm_logit, mask)
        assert not learner.fm_trusted
        learner.judge(learner.predict(b))
        if verdict is not None:
            assert learner.young_pending and learner.young_evidence.fm_auc == 0.0  # backwards: AUC 0
            learner.settle_young(YoungVerdict(0.1, 3.0 if verdict else 1.0, 3, verdict))
        parts = learner.step(wrong)
        assert ("young_prior" in parts or "young_aux" in parts) is bool(verdict)
        learners[verdict] = learner
    off, without = learners[False].model, learners[None].model
    assert torch.equal(off.serving_head.weight, without.serving_head.weight)
    assert not torch.equal(learners[True].model.serving_head.weight, without.serving_head.weight)
    judged = learners[False]
    judged.begin_window(y, wrong.fm_logit, mask)  # a later labeled window: nothing more to judge
    judged.judge(judged.predict(b))
    assert not judged.young_pending
    restored = StudentLearner(judged.model, StudentConfig(), judged.distill)
    restored.load_state_dict(judged.state_dict())
    assert restored.young_verdict == judged.young_verdict
    assert variant(DEFAULT_VARIANT).fm_gate_young_z == 1.5 and variant("kd_single_head").fm_gate_young_z is None
    assert variant(f"{DEFAULT_VARIANT}@fm_gate_young_z=none").fm_gate_young_z is None  # stop 38's default


def test_the_experiment_judges_the_young_fm_once_per_seed_on_every_tenants_student_before_it():
    tiny = {"num_windows": 4, "rows_per_window": 1500, "num_tenants": 2, "num_users": 200, "num_ads": 50}
    never, off = "kd_sa@fm_gate_young_z=1e9", "kd_sa@fm_gate_young_aux=0,fm_gate_young_prior=0"
    cfg = ExperimentConfig.parse(
        {
            "source": {"dataset": "synthetic", "synthetic": tiny},
            "fm": {"size": 1, "epochs_per_window": 1},
            "seeds": 1,
            "variants": ["vm_only", "kd_sa@fm_gate_young_z=-1e9", never, off],
        }
    )
    stream = SyntheticStream(SyntheticConfig(**tiny)).stream()
    stats: dict = {}
    records = run_experiment(cfg, stream, stats=stats)
    (verdict,) = stats["young_fm"]
    assert verdict["on"]["kd_sa@fm_gate_young_z=-1e9"] and not verdict["on"][never] and "vm_only" not in verdict["on"]
    # the evidence is vm_only's scores of window 1 (the FM's first) against the FM's, every tenant pooled
    rec = {(r["variant"], r["tenant"], r["window"]): r for r in records}
    evidence = [
        RankEvidence(rec[("fm", n, 1)]["auc"], rec[("vm_only", n, 1)]["auc"], p, rec[("fm", n, 1)]["rows"] - p)
        for n in stream.spec.tenant_names
        if (p := rec[("fm", n, 1)]["positives"])
    ]
    assert verdict["tenants"] == 2 and verdict["z"] == pytest.approx(young_verdict(evidence, 0).z, rel=1e-6)
    # the stand-in is right: kd_sa's own student scores the FM's first window as vm_only's does
    for n in stream.spec.tenant_names:
        assert rec[("kd_sa@fm_gate_young_z=-1e9", n, 1)]["auc"] == rec[("vm_only", n, 1)]["auc"]
    # judged off: the young FM's terms gone, the rest as the default
    for n in stream.spec.tenant_names:
        assert [rec[(never, n, t)]["ne"] for t in range(4)] == [rec[(off, n, t)]["ne"] for t in range(4)]
