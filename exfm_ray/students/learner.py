"""One student's training step in Algorithm-1 order (exfm-method.md section 7); the one
student loop, reused by the Ray Train workers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from exfm_ray.data.batching import Batch
from exfm_ray.optim import SplitOptimizer
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
        self.distill = distill
        self.grad_sync = grad_sync
        adapter = list(model.adapter.parameters()) if model.adapter is not None else []
        adapter_ids = {id(p) for p in adapter}
        self.adapter_params = adapter
        self.vm_params = [p for p in model.parameters() if id(p) not in adapter_ids]
        self.vm_opt = SplitOptimizer(model, cfg.lr, cfg.embedding_lr, exclude=adapter_ids)
        # The adapter has its own optimizer: it learns only from fresh labels (L_sta).
        self.sa_opt = torch.optim.Adam(adapter, lr=distill.sa_lr) if adapter else None

    def step(self, batch: Batch) -> dict[str, float]:
        self.model.train()
        t_sa = None
        parts: dict[str, float] = {}
        adapter = self.model.adapter
        if adapter is not None and self.sa_opt is not None:
            # (1) one SA step on the current batch's true labels
            l_sta = adapter_loss(adapter(batch.fm_logit), batch.label, batch.fm_mask, self.distill)
            self.sa_opt.zero_grad()
            l_sta.backward()
            if self.grad_sync is not None:
                self.grad_sync(self.adapter_params)
            self.sa_opt.step()
            parts["adapter"] = float(l_sta.detach())
            # (2) the adapted target from the updated SA, without gradient
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
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.vm_opt.load_state_dict(state["vm_opt"])
        if self.sa_opt is not None:
            self.sa_opt.load_state_dict(state["sa_opt"])

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """Serving-head probabilities; the adapter is not touched (frozen during evaluation)."""
        self.model.eval()
        return torch.sigmoid(self.model(batch.sparse, batch.dense).s)
