"""One student's training step in Algorithm-1 order (exfm-method.md section 7); the one
student loop, reused by the Ray Train workers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from exfm_ray.data.batching import Batch
from exfm_ray.optim import SplitOptimizer
from exfm_ray.priors import base_rate, prior_logit, smoothed_rate
from exfm_ray.students.calibration import PLATT_PENALTY, platt_fit
from exfm_ray.students.config import DistillConfig, StudentConfig
from exfm_ray.students.losses import adapter_loss, student_loss, young_fm_loss
from exfm_ray.students.model import Student
from exfm_ray.students.young_fm import RankEvidence, YoungVerdict, rank_evidence

GradSync = Callable[[list[torch.nn.Parameter]], None]
# The FM gate pools its evidence over the current window and the ones before it: one window of a
# small tenant holds a handful of positives, too few to judge the FM alone (frappe-rare: a
# per-window gate lost 0.2% NE by distrusting a good FM on noise).
FM_GATE_WINDOWS = 3
# ... or, with fm_gate_positives, as many of the newest windows as hold that many positives, up to this
FM_GATE_MAX_WINDOWS = 8


class StudentLearner:
    """Args:
    grad_sync: called with a parameter list between each backward and its optimizer step;
        data-parallel trainers pass an all-reduce there (None: one process).
    """

    def __init__(self, model: Student, cfg: StudentConfig, distill: DistillConfig, grad_sync: GradSync | None = None):
        self.model = model
        self.cfg = cfg
        self.distill = distill
        self.grad_sync = grad_sync
        adapter = list(model.adapter.parameters()) if model.adapter is not None else []
        adapter_ids = {id(p) for p in adapter}
        self.adapter_params = adapter
        self.vm_params = [p for p in model.parameters() if id(p) not in adapter_ids]
        self.vm_opt = SplitOptimizer(model, cfg.lr, cfg.embedding_lr, exclude=adapter_ids)
        # The adapter has its own optimizer: it learns only from fresh labels (L_sta).
        self.sa_opt = torch.optim.Adam(adapter, lr=distill.sa_lr) if adapter else None
        self.started = False
        self.adapter_started = False
        self.fm_trusted = True
        self.seen = (0, 0.0)  # rows and positives of the windows begun so far: the constant the FM must beat
        # the FM's labels recalibrated (fm_calibrate): logit -> a * logit + b, fitted on fm_rows
        self.fm_affine = (1.0, 0.0)
        # the young head's recalibration (fm_gate_young_target='calibrated'), refitted every window it is used in
        self.young_affine = (1.0, 0.0)
        self.fm_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # per window: labels, FM logits
        # labels, gate target, mask of the window begun, until `judge` (fm_gate_against='student')
        self.judging: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # per window: summed log loss of the FM (or of the mix `judge` scores), of what it must beat
        # (the constant, or the student); positives; the standard error of the difference
        self.fm_record: list[tuple[float, float, float, float]] = []
        # per window: the student's summed log loss on it (scored before training on it) and the constant's
        # (fm_gate_young_prior_when='student_behind'); the window's labels and constant until `judge`
        self.student_record: list[tuple[float, float]] = []
        self.scoring: tuple[torch.Tensor, float] | None = None
        # fm_gate_young_z: the FM's first labeled window until `judge` (labels, FM logits, mask), then this
        # tenant's evidence, awaiting the verdict pooled over tenants that the trainer hands to `settle_young`
        self.ranking: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.young_pending = False
        self.young_evidence: RankEvidence | None = None
        self.young_verdict: YoungVerdict | None = None  # None: never judged, the young FM's terms apply
        # what the VM step distills with in a window the gate distrusts (fm_gate_floor > 0)
        f = distill.fm_gate_floor
        self.floored = distill.model_copy(
            update={"w": distill.w * f, "w_sa": distill.w_sa * f, "w_serving": distill.w_serving * f}
        )

    def begin_window(
        self, labels: torch.Tensor, fm_logit: torch.Tensor | None = None, fm_mask: torch.Tensor | None = None
    ):
        """Before a window is scored and trained on, with that window's labels (and FM columns).

        First window: every head starts at the window's base rate. The first window with FM
        labels: with `sa_start`, the adapter starts at the log-odds gap between the labels and the
        FM's mean prediction there. Every window: with `fm_gate`, the FM's labels are used for
        distillation unless they lose to the tenant's constant base rate on the pooled labels by more
        than `fm_gate_z` standard errors. All of this
        reads numbers the trainer has when it trains on the window (its labels), never the scores.
        """
        labeled = fm_mask is not None and bool(fm_mask.any())
        rate = smoothed_rate(self.seen[1], self.seen[0]) if self.seen[0] else base_rate(labels)
        self.scoring = (labels, rate)
        if not self.started:
            if self.cfg.base_rate_start:
                self.model.start_at_base_rate(base_rate(labels))
            self.started = True
        adapter = self.model.adapter
        if adapter is not None and labeled and not self.adapter_started:
            if self.distill.sa_start:
                y = labels[fm_mask]
                mean_fm = float(torch.sigmoid(fm_logit[fm_mask]).mean())
                gap = prior_logit(base_rate(y)) - prior_logit(mean_fm)
                # A rate from a handful of positives is noise: trust it in proportion to the evidence.
                positives = float(y.sum())
                adapter.start_at_offset(gap * positives / (positives + self.distill.sa_start_prior))
            self.adapter_started = True
        if labeled and not self.fm_record and self.distill.fm_gate_young_z is not None and self.young_verdict is None:
            self.ranking = (labels, fm_logit, fm_mask)
        if labeled:
            # The gate judges the label the student would distill: the adapted one where there is an
            # adapter (as it stands before this window, so out of sample), else the FM's own.
            target = fm_logit[fm_mask]
            if adapter is not None and self.distill.fm_gate_target == "adapted":
                with torch.no_grad():
                    target = adapter(target)
            # (a gate judging against the student has no recalibration of its own: it judges in `judge`)
            calibrated = self.distill.fm_calibrate or self.distill.fm_gate_target == "calibrated"
            calibrated = calibrated and self.distill.fm_gate_against != "student"
            # the young head's target, fitted only while the FM is young (this window's record not yet counted)
            young_calibrated = (
                self.distill.fm_gate
                and self.distill.fm_gate_young_target == "calibrated"
                and self.distill.fm_gate_young_aux > 0
                and len(self.fm_record) + 1 < FM_GATE_WINDOWS
            )
            if calibrated or young_calibrated:
                self.fm_rows = [*self.fm_rows, (labels[fm_mask].clone(), fm_logit[fm_mask].clone())][-FM_GATE_WINDOWS:]
                y, f = (torch.cat(x) for x in zip(*self.fm_rows, strict=True))
                a, b = platt_fit(y, f, self.distill.fm_calibrate_prior)
            else:
                self.fm_rows = []  # the young head's rows, once it is done with them
            self.young_affine = (a, b) if young_calibrated else (1.0, 0.0)
        if labeled and self.distill.fm_gate_against == "student":
            self.judging = (labels[fm_mask], target.detach(), fm_mask)  # indexing copied them; see `judge`
        elif labeled:
            losses = fm_and_constant_loss(labels[fm_mask], target, rate)
            fm_loss, flat_loss, spread = self._pool(losses, float(labels[fm_mask].sum()))
            if calibrated:
                raw_wins = fm_loss < flat_loss
                if self.distill.fm_calibrate == "fallback":
                    # the FM as it is where it beats the constant; recalibrated where it loses
                    self.fm_affine = (1.0, 0.0) if raw_wins else (a, b)
                elif self.distill.fm_calibrate:
                    self.fm_affine = (a, b)
                if self.distill.fm_gate_target == "calibrated" and not raw_wins:
                    fm_loss = fm_and_constant_loss(y, f * a + b, 0.5)[0] + PLATT_PENALTY
            self._trust_if(fm_loss, flat_loss, spread)
        self.seen = (self.seen[0] + len(labels), self.seen[1] + float(labels.sum()))

    def judge(self, predictions: torch.Tensor) -> None:
        """After the student has scored the window (before training on it), with fm_gate_against='student':
        distill while the mix the distillation term pulls towards beats the student's own predictions. Always:
        the student's own score of the window against the constant's (fm_gate_young_prior_when)."""
        if self.scoring is not None:
            y, rate = self.scoring
            self.scoring = None
            scored = torch.logit(predictions.double().clamp(1e-7, 1 - 1e-7))
            self.student_record = [*self.student_record, fm_and_constant_loss(y, scored, rate)[:2]][-FM_GATE_WINDOWS:]
        if self.ranking is not None:
            self.young_evidence = rank_evidence(*self.ranking[:2], predictions, self.ranking[2])
            self.ranking, self.young_pending = None, True
        if self.judging is None:
            return
        y, target, mask = self.judging
        self.judging = None
        w = self.distill.w
        p_s = predictions[mask].double().clamp(1e-7, 1 - 1e-7)
        mix = ((p_s + w * torch.sigmoid(target.double())) / (1 + w)).clamp(1e-7, 1 - 1e-7)
        yd = y.double()
        nll_mix = -(yd * mix.log() + (1 - yd) * (1 - mix).log())
        nll_s = -(yd * p_s.log() + (1 - yd) * (1 - p_s).log())
        self._trust_if(*self._pool(sums_and_spread(nll_mix, nll_s), float(y.sum())))

    def _pool(self, losses: tuple[float, float, float], positives: float) -> tuple[float, float, float]:
        """Record a window's (loss, rival loss, spread) and return the gate's pooled evidence."""
        loss, rival, spread = losses
        self.fm_record = [*self.fm_record, (loss, rival, positives, spread)][-FM_GATE_MAX_WINDOWS:]
        return pooled_evidence(self.fm_record, self.distill.fm_gate_positives)

    def _trust_if(self, loss: float, rival: float, spread: float) -> None:
        # Distrust the FM only when it loses by more than the noise of a few positives allows.
        # ... and only once it has a record of FM_GATE_WINDOWS windows: an FM that has seen one or
        # two windows of traffic gets no benefit of the doubt.
        margin = self.distill.fm_gate_z * spread if len(self.fm_record) >= FM_GATE_WINDOWS else 0.0
        self.fm_trusted = not self.distill.fm_gate or loss < rival + margin

    def settle_young(self, verdict: YoungVerdict) -> None:
        """The young FM's verdict pooled over tenants (students/young_fm.py); before `step` on the window judged."""
        self.young_verdict, self.young_pending = verdict, False

    def student_behind(self) -> bool:
        """Whether the constant is worth distilling (fm_gate_young_prior): always, or while the student's own
        scores, pooled over its last 3 windows, do not beat the constant's (a student that ranks already would
        only be compressed towards the mean)."""
        if self.distill.fm_gate_young_prior_when == "always" or not self.student_record:
            return True
        student, flat = (sum(x) for x in zip(*self.student_record, strict=True))
        return student >= flat

    def step(self, batch: Batch) -> dict[str, float]:
        """One training step on a batch of the window begun. The trainers call, per window, `begin_window`, then
        `judge` with the student's scores of the whole window, then `step`; a learner never judged treats its student
        as behind the constant (fm_gate_young_prior applies as with 'always')."""
        self.model.train()
        t_sa = None
        parts: dict[str, float] = {}
        adapter = self.model.adapter
        raw_fm = batch.fm_logit  # the young head's recalibration is fitted on the FM as it is
        if self.fm_affine != (1.0, 0.0):
            batch = dataclasses.replace(batch, fm_logit=batch.fm_logit * self.fm_affine[0] + self.fm_affine[1])
        if adapter is not None and self.sa_opt is not None:
            if self.distill.sa_order == "after":
                with torch.no_grad():
                    t_sa = torch.sigmoid(adapter(batch.fm_logit))
            # (1) one SA step on the current batch's true labels
            l_sta = adapter_loss(adapter(batch.fm_logit), batch.label, batch.fm_mask, self.distill)
            self.sa_opt.zero_grad()
            l_sta.backward()
            if self.grad_sync is not None:
                self.grad_sync(self.adapter_params)
            self.sa_opt.step()
            parts["adapter"] = float(l_sta.detach())
            # (2) the adapted target from the updated SA, without gradient
            if t_sa is None:
                with torch.no_grad():
                    t_sa = torch.sigmoid(adapter(batch.fm_logit))
        # (3) one VM step. In a window the gate distrusts, the FM's labels count as missing (the DAS's mask
        # semantics); once the FM has a record, fm_gate_floor distills them at that share of their weight; before,
        # a young FM gets no benefit of the doubt on the serving head: fm_gate_young_aux sends its labels to a
        # training-only head and fm_gate_young_prior puts the constant that beat them on the serving head
        out = self.model(batch.sparse, batch.dense, batch.history)
        young = len(self.fm_record) < FM_GATE_WINDOWS
        prior = self.distill.fm_gate_young_prior if self.distill.mode != "none" else 0.0
        judged_off = self.young_verdict is not None and not self.young_verdict.on
        if not self.fm_trusted and young and not judged_off and (out.young is not None or prior > 0):
            prior = prior if self.student_behind() else 0.0
            rate = smoothed_rate(self.seen[1], self.seen[0])  # the tenant's, this window's labels included
            y, f, m = batch.label, batch.fm_logit, batch.fm_mask
            if self.distill.fm_gate_young_target == "calibrated":
                # the FM's ranking without its calibration, which the gate found wanting, for the young head only
                t_sa = torch.sigmoid(raw_fm * self.young_affine[0] + self.young_affine[1])
            loss, vm_parts = young_fm_loss(out.s, out.young, y, f, m, t_sa, rate, prior, self.distill)
        else:
            mask, distill = batch.fm_mask, self.distill if self.fm_trusted else self.floored
            if not self.fm_trusted and (young or self.distill.fm_gate_floor == 0):
                mask = torch.zeros_like(batch.fm_mask)
            loss, vm_parts = student_loss(out.s, out.d, out.d2, batch.label, batch.fm_logit, mask, t_sa, distill)
        self.vm_opt.zero_grad()
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.vm_params)
        self.vm_opt.step()
        return {**parts, **vm_parts, "total": float(loss.detach())}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "vm_opt": self.vm_opt.state_dict(),
            "sa_opt": self.sa_opt.state_dict() if self.sa_opt is not None else None,
            "started": self.started,
            "adapter_started": self.adapter_started,
            "fm_trusted": self.fm_trusted,
            "seen": self.seen,
            "fm_record": self.fm_record,
            "fm_affine": self.fm_affine,
            "fm_rows": self.fm_rows,
            "student_record": self.student_record,
            "young_verdict": self.young_verdict.to_dict() if self.young_verdict is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        model, vm_opt = state["model"], state["vm_opt"]
        head = self.model.aux_young
        if head is not None and "aux_young.weight" not in model:
            # a checkpoint from before the young FM's head: the head (registered last) starts fresh, Adam's with it,
            # its bias where the trained serving head's is (the start at the base rate has passed)
            fresh = {"weight": head.weight.detach().clone(), "bias": model["serving_head.bias"].clone()}
            model = {**model, **{f"aux_young.{k}": v for k, v in fresh.items()}}
            vm_opt = [*vm_opt[:-1], _with_fresh_params(vm_opt[-1], len(list(head.parameters())))]
        self.model.load_state_dict(model)
        self.started = state.get("started", True)  # checkpoints older than `started` had trained
        self.adapter_started = state.get("adapter_started", True)
        self.fm_trusted = state.get("fm_trusted", True)
        self.seen = tuple(state.get("seen", (0, 0.0)))
        # records before the positives were counted: 3 windows' worth, as the gate pooled then
        # (and before the spread was: no margin)
        self.fm_record = [
            (*x, math.inf, 0.0) if len(x) == 2 else (*x, 0.0) if len(x) == 3 else tuple(x)
            for x in state.get("fm_record", [])
        ]
        self.fm_affine = tuple(state.get("fm_affine", (1.0, 0.0)))
        self.fm_rows = [tuple(x) for x in state.get("fm_rows", [])]
        self.student_record = [tuple(x) for x in state.get("student_record", [])]
        verdict = state.get("young_verdict")  # (the evidence is the trainer's to pool before the window trains)
        self.young_verdict = YoungVerdict(**verdict) if verdict else None
        self.vm_opt.load_state_dict(vm_opt)
        if self.sa_opt is not None:
            self.sa_opt.load_state_dict(state["sa_opt"])

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """Serving-head probabilities; the adapter is not touched (frozen during evaluation)."""
        self.model.eval()
        return torch.sigmoid(self.model(batch.sparse, batch.dense, batch.history).s)


def pooled_evidence(record: list[tuple[float, ...]], positives: float) -> tuple[float, float, float]:
    """Summed FM and constant log loss over the newest windows that together hold `positives`
    positives (all of them if fewer): as fresh as the evidence allows, since the FM changes every
    window, and never judged on a handful of positives. Third: the standard error of the
    difference of the two sums (rows independent)."""
    if math.isinf(positives):
        record = record[-FM_GATE_WINDOWS:]
    fm = flat = count = var = 0.0
    for fm_w, flat_w, pos_w, spread_w in reversed(record):
        fm, flat, count, var = fm + fm_w, flat + flat_w, count + pos_w, var + spread_w**2
        if count >= positives:
            break
    return fm, flat, math.sqrt(var)


def fm_and_constant_loss(labels: torch.Tensor, fm_logit: torch.Tensor, rate: float) -> tuple[float, float, float]:
    """Summed log loss of the FM's labels and of the constant `rate` (the tenant's rate so far) on
    these rows, and the standard error of their difference. A teacher that loses to that constant
    carries no signal the labels lack, only its errors; summed, not averaged, so windows pool by
    their rows as in the guard."""
    y = labels.float()
    fm = torch.nn.functional.binary_cross_entropy_with_logits(fm_logit.float(), y, reduction="none")
    flat = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.full_like(y, prior_logit(rate)), y, reduction="none"
    )
    return sums_and_spread(fm, flat)


def sums_and_spread(loss: torch.Tensor, rival: torch.Tensor) -> tuple[float, float, float]:
    """Sums of two per-row losses over the same rows, and the standard error of the difference of
    the sums (rows independent)."""
    diff = (loss - rival).double()
    spread = math.sqrt(float(((diff - diff.mean()) ** 2).sum())) if len(diff) > 1 else 0.0
    return float(loss.sum()), float(rival.sum()), spread


def _with_fresh_params(opt_state: dict, n: int) -> dict:
    """An optimizer state with n more parameters at the end of its last group, with no state: they start fresh."""
    groups = [dict(g) for g in opt_state["param_groups"]]
    last = max((i for g in groups for i in g["params"]), default=-1)
    groups[-1]["params"] = [*groups[-1]["params"], *range(last + 1, last + 1 + n)]
    return {**opt_state, "param_groups": groups}
