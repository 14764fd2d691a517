"""One tenant's student walking the augmented windows: evaluate on window t, then train on it.

The one tenant training loop: the Ray Train workers run it (`train_loop.py`) and so does the
plain in-process baseline of `exfm bench train`. It holds the student (and, with `control`, a
twin that never sees the FM), the per-window history, and everything a checkpoint must restore.
Shape letters: N rows of the window, B batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from exfm_ray.data.batching import WindowTensors
from exfm_ray.errors import ExfmError
from exfm_ray.loopfm.features import row_histories
from exfm_ray.loopfm.store import StoreView, entity_ids
from exfm_ray.metrics import evaluate
from exfm_ray.priors import base_rate
from exfm_ray.students.config import variant
from exfm_ray.students.guard import NE_KEY, blend, decide, trailing_base_rate
from exfm_ray.students.learner import GradSync, StudentLearner
from exfm_ray.students.model import BlendServing, ServingStudent, build_student, constant_serving
from exfm_ray.students.young_fm import YoungVerdict
from exfm_ray.tenants.config import TenantView

EVAL_BATCH = 4096
Progress = Callable[[str, int, int], None]


@dataclass
class Scored:
    """A window evaluated and not trained on yet: its record so far and the tenant's rows."""

    record: dict
    rows: WindowTensors
    versions: set[str]
    began: float


class TenantRun:
    """Args:
    view: the tenant resolved against the stream (its rows, features, task).
    rank, world_size: this worker's place among the run's data-parallel workers; each trains on
        its slice of every global batch, and `grad_sync` averages gradients so replicas agree.
    fm_dim: the FM embedding size, for a LoopFM variant (its windows then come with a store view).
    """

    def __init__(
        self,
        view: TenantView,
        *,
        rank: int = 0,
        world_size: int = 1,
        grad_sync: GradSync | None = None,
        fm_dim: int = 0,
    ):
        cfg = view.tenant
        self.view = view
        self.rank, self.world_size = rank, world_size
        name = cfg.name
        distill = cfg.distill()
        self.loop_keys = list(cfg.student.loopfm.store.keys) if distill.loopfm else []
        torch.manual_seed(cfg.seed)
        self.learner = StudentLearner(build_student(view.spec, name, cfg.student, distill, fm_dim), cfg.student,
                                      distill, grad_sync)  # fmt: skip
        self.control = None
        if cfg.trains_control:
            # Same seed, and the shared parts are built first: the twin starts from the same weights.
            torch.manual_seed(cfg.seed)
            alone = variant("vm_only")
            self.control = StudentLearner(build_student(view.spec, name, cfg.student, alone), cfg.student, alone,
                                          grad_sync)  # fmt: skip
        self.features = list(view.spec.tenants[0].features)
        self.dense = list(view.spec.tenants[0].dense)
        self.history: list[dict] = []
        self.fm_versions: set[str] = set()

    @property
    def last_window(self) -> int:
        return self.history[-1]["window"] if self.history else -1

    def window(
        self, t: int, augmented: pa.Table, progress: Progress | None = None, store: StoreView | None = None
    ) -> dict:
        """Evaluate on this tenant's rows of augmented window t, then train one pass on them.
        A LoopFM student needs `store`: the representation store as of a window before t.
        Returns the window's record (also appended to `history`). A learner that judges the young FM
        (fm_gate_young_z) and is not told the verdict pooled over tenants (`score`, `settle_young`, `fit`, as
        the Ray Train runs do) gives it the benefit of the doubt."""
        return self.fit(self.score(t, augmented, store), progress)

    def score(self, t: int, augmented: pa.Table, store: StoreView | None = None) -> Scored:
        """The first half of `window`: evaluate on the window, before training on it."""
        began = time.time()
        table = self.view.select(augmented)
        rows = WindowTensors(table, self.view.spec)
        versions = {v for v in table.column("fm_version").to_pylist() if v}
        record: dict = {"window": t, "rows": rows.num_rows, "fm_versions": sorted(versions)}
        if self.loop_keys:
            record["store_version"] = self._attach_history(t, table, rows, store)
        record.update(self._evaluate(rows))
        return Scored(record, rows, versions, began)

    def settle_young(self, scored: Scored, verdict: YoungVerdict, pooled: list[str] | None = None) -> None:
        """The verdict, and the tenants whose evidence it pooled, in the window's record."""
        self.learner.settle_young(verdict)
        scored.record.update({f"young_fm_{k}": v for k, v in verdict.to_dict().items()})
        if pooled is not None:
            scored.record["young_fm_pooled"] = pooled

    def fit(self, scored: Scored, progress: Progress | None = None) -> dict:
        """The second half of `window`: train one pass on the window scored; returns its record."""
        record, rows, versions, began = scored.record, scored.rows, scored.versions, scored.began
        started = time.perf_counter()
        losses = self._train(rows, progress)
        seconds = time.perf_counter() - started
        self._guard(record)
        record.update(
            loss=float(np.mean(losses)) if losses else math.nan,
            train_rows=rows.num_rows,
            train_s=round(seconds, 4),
            rows_per_s=rows.num_rows / seconds if seconds > 0 else math.nan,
            masked_rows=int((~rows.fm_mask).sum()),
            started_at=began,
            ended_at=time.time(),
        )
        self.fm_versions |= versions
        self.history.append(record)
        return record

    def _attach_history(self, t: int, table: pa.Table, rows: WindowTensors, store: StoreView | None) -> int | None:
        if store is None:
            raise ExfmError(f"tenant {self.view.tenant.name!r} reads LoopFM histories: window {t} needs a store view")
        if store.version is not None and store.version >= t:
            raise ExfmError(f"window {t} may not read store version {store.version}: it holds window {t}'s own events")
        entities = {k: entity_ids(table, k) for k in self.loop_keys}
        own = self.view.tenant.student.loopfm
        rows.set_history(row_histories(store, self.loop_keys, entities, own.store.k, own.pooling))
        return store.version

    def _guard(self, record: dict) -> None:
        """Which model served this window (chosen after the previous one) and which one to publish
        now; with the guard off, always the ExFM student."""
        served = self.history[-1]["guard_choice"] if self.history else "exfm"
        record.update(served=served, served_ne=record.get(NE_KEY[served]))
        cfg = self.view.tenant
        if cfg.guard and self.control is not None:
            decision = decide([*self.history, record], cfg.guard_windows)
            record.update(guard_choice=decision.serve, guard_reason=decision.reason)
        else:
            record.update(guard_choice="exfm", guard_reason="guard off")

    @property
    def served_choice(self) -> str:
        return self.history[-1]["guard_choice"] if self.history else "exfm"

    def served_model(self) -> ServingStudent | BlendServing:
        """The serving model the guard chose after the last window (shares weights, or a constant)."""
        choice = self.served_choice
        if choice == "control" and self.control is not None:
            return self.control.model.serving_model()
        if choice == "blend" and self.control is not None:
            return BlendServing(self.learner.model.serving_model(), self.control.model.serving_model())
        if choice == "base_rate":
            rate = trailing_base_rate(self.history, self.view.tenant.guard_windows)
            return constant_serving(self.learner.model, rate if rate is not None else 0.5)
        return self.learner.model.serving_model()

    def healthy(self) -> bool:
        """A checkpoint worth serving: the last window trained to a finite loss, finite weights."""
        if not self.history or not math.isfinite(self.history[-1]["loss"]):
            return False
        return all(torch.isfinite(p).all() for p in self.learner.model.parameters())

    def _evaluate(self, rows: WindowTensors) -> dict:
        out: dict = {}
        if rows.num_rows == 0:
            return out
        y = rows.label.numpy()
        learners = {"": self.learner, "control_": self.control}
        probs = {}
        for prefix, learner in learners.items():
            if learner is None:
                continue
            learner.begin_window(
                rows.label, rows.fm_logit, rows.fm_mask
            )  # every rank sees the whole window: same prior everywhere
            p = torch.cat([learner.predict(b) for b in rows.batches(EVAL_BATCH, self.features, self.dense)])
            learner.judge(p)  # a gate judging the FM against the student reads its scores of the window
            probs[prefix] = p.numpy()
            out.update({f"{prefix}{k}": v for k, v in evaluate(y, probs[prefix]).items() if k != "rows"})
        if len(probs) == 2:  # the guard's blend candidate: what BlendServing answers
            mixed = evaluate(y, blend(probs[""], probs["control_"]))
            out.update(blend_ne=mixed["ne"], blend_log_loss=mixed["log_loss"])
        # The third candidate of the guard: the constant rate of the trailing windows trained on
        # (the first window: its own rate, as every fresh head starts there).
        rate = trailing_base_rate(self.history, self.view.tenant.guard_windows)
        rate = base_rate(rows.label) if rate is None else rate
        flat = evaluate(y, np.full(len(y), rate))
        out.update(base_rate=rate, base_rate_ne=flat["ne"], base_rate_log_loss=flat["log_loss"])
        mask = rows.fm_mask.numpy()
        if mask.any():
            fm = evaluate(y[mask], torch.sigmoid(rows.fm_logit[mask]).numpy())
            out.update(fm_ne=fm["ne"], fm_auc=fm["auc"], fm_rows=int(mask.sum()))
        return out

    def _train(self, rows: WindowTensors, progress: Progress | None) -> list[float]:
        """One pass in time order. A global batch holds batch_size rows per worker; each worker
        trains on its equal slice (a last global batch smaller than the world drops < world rows)."""
        b, world = self.learner_batch_size, self.world_size
        starts = list(range(0, rows.num_rows, b * world))
        losses = []
        for i, lo in enumerate(starts):
            n = min(b * world, rows.num_rows - lo) // world
            if n == 0:
                continue
            a = lo + self.rank * n
            batch = rows.batch(a, a + n, self.features, self.dense)
            losses.append(self.learner.step(batch)["total"])
            if self.control is not None:
                self.control.step(batch)
            if progress is not None:
                progress("train", i + 1, len(starts))
        return losses

    @property
    def learner_batch_size(self) -> int:
        return self.view.tenant.student.batch_size

    def state_dict(self) -> dict:
        return {
            "student": self.learner.state_dict(),
            "control": self.control.state_dict() if self.control is not None else None,
            "history": self.history,
            "fm_versions": sorted(self.fm_versions),
        }

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state["student"])
        if self.control is not None and state["control"] is not None:
            self.control.load_state_dict(state["control"])
        self.history = list(state["history"])
        self.fm_versions = set(state["fm_versions"])
