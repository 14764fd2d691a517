"""In-process FM training and labeling: the one FM loop, reused by the Ray jobs."""

from __future__ import annotations

import torch

from exfm_ray.data.batching import Batch, WindowTensors
from exfm_ray.fm.model import FMConfig, FoundationModel
from exfm_ray.optim import SplitOptimizer
from exfm_ray.students.losses import bce


def head_logit(logits: torch.Tensor, tenant: torch.Tensor) -> torch.Tensor:
    """Pick each row's own tenant head: logits [B, H], tenant [B] -> [B]."""
    return logits.gather(1, tenant.unsqueeze(1)).squeeze(1)


class FMLearner:
    """Trains the FM one pass per window on the union of all tenants' rows.

    Each row trains the head of the tenant that logged it; the trunk sees every tenant's traffic.
    """

    def __init__(self, model: FoundationModel, cfg: FMConfig, seed: int = 0):
        self.model = model
        self.cfg = cfg
        self.opt = SplitOptimizer(model, cfg.lr, cfg.embedding_lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.windows_trained = 0

    def step(self, batch: Batch) -> float:
        self.model.train()
        out = self.model(batch.sparse, batch.dense)
        loss = bce(head_logit(out.logits, batch.tenant), batch.label).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def train_window(self, rows: WindowTensors) -> float:
        """cfg.epochs_per_window passes over the window, batches in a seeded random order."""
        losses = []
        batches = rows.batches(self.cfg.batch_size, self.model.feature_names)
        for _ in range(self.cfg.epochs_per_window):
            for i in torch.randperm(len(batches), generator=self.gen).tolist():
                losses.append(self.step(batches[i]))
        self.windows_trained += 1
        return sum(losses) / max(len(losses), 1)

    @torch.no_grad()
    def predict(self, rows: WindowTensors, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """All heads' logits [N, H] and hidden [N, Dh] for every row."""
        self.model.eval()
        logits, hidden = [], []
        for b in rows.batches(batch_size, self.model.feature_names):
            out = self.model(b.sparse, b.dense)
            logits.append(out.logits)
            hidden.append(out.hidden)
        return torch.cat(logits), torch.cat(hidden)
