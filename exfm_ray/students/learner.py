"""One student's training step in Algorithm-1 order (exfm-method.md section 7); the one
student loop, reused by the Ray Train workers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from exfm_ray.data.batching import Batch
from exfm_ray.optim import SplitOptimizer
from exfm_ray.priors import base_rate, prior_logit
from exfm_ray.students.config import DistillConfig, StudentConfig
from exfm_ray.students.losses import adapter_loss, student_loss
from exfm_ray.students.model import Student

GradSync = Callable[[list[torch.nn.Parameter]], None]


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

    def start(self, labels: torch.Tensor, fm_logit: torch.Tensor | None = None, fm_mask: torch.Tensor | None = None):
        """Before a window is scored, with that window's labels (and FM columns).

        First window: every head starts at the window's base rate. The first window with FM
        labels: the adapter starts at the log-odds gap between the labels and the FM's mean
        prediction there (a stale or biased FM is corrected from its first batch, not after the
        adapter's optimizer has crawled to it). Both use one number of the window: the tenant's
        positive rate, which any ads team knows before it trains a model. Later calls do nothing.
        """
        if not self.started:
            if self.cfg.base_rate_start:
                self.model.start_at_base_rate(base_rate(labels))
            self.started = True
        adapter = self.model.adapter
        if adapter is None or self.adapter_started or fm_mask is None or not bool(fm_mask.any()):
            return
        if self.distill.sa_start:
            y = labels[fm_mask]
            mean_fm = float(torch.sigmoid(fm_logit[fm_mask]).mean())
            gap = prior_logit(base_rate(y)) - prior_logit(mean_fm)
            # A rate from a handful of positives is noise: trust it in proportion to the evidence.
            positives = float(y.sum())
            adapter.start_at_offset(gap * positives / (positives + self.distill.sa_start_prior))
        self.adapter_started = True

    def step(self, batch: Batch) -> dict[str, float]:
        self.model.train()
        t_sa = None
        parts: dict[str, float] = {}
        adapter = self.model.adapter
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
        # (3) one VM step
        out = self.model(batch.sparse, batch.dense)
        loss, vm_parts = student_loss(
            out.s, out.d, out.d2, batch.label, batch.fm_logit, batch.fm_mask, t_sa, self.distill
        )
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
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.started = state.get("started", True)  # checkpoints older than `started` had trained
        self.adapter_started = state.get("adapter_started", True)
        self.vm_opt.load_state_dict(state["vm_opt"])
        if self.sa_opt is not None:
            self.sa_opt.load_state_dict(state["sa_opt"])

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """Serving-head probabilities; the adapter is not touched (frozen during evaluation)."""
        self.model.eval()
        return torch.sigmoid(self.model(batch.sparse, batch.dense).s)
