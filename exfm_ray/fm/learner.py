"""In-process FM training and labeling: the one FM loop, reused by the Ray jobs."""

from __future__ import annotations

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from exfm_ray.data.batching import Batch, WindowTensors
from exfm_ray.fm.config import FMConfig
from exfm_ray.optim import SplitOptimizer
from exfm_ray.priors import base_rate, prior_logit


def head_logit(logits: torch.Tensor, tenant: torch.Tensor) -> torch.Tensor:
    """Pick each row's own tenant head: logits [B, H], tenant [B] -> [B]."""
    return logits.gather(1, tenant.unsqueeze(1)).squeeze(1)


class FMLearner:
    """Trains the FM one pass per window on the union of all tenants' rows.

    Each row trains the head of the tenant that logged it; the trunk sees every tenant's traffic.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: FMConfig,
        seed: int = 0,
        *,
        optimizer=None,
        rank: int = 0,
        world_size: int = 1,
        fresh: bool = True,
    ):
        """`model` is the FM or its DMP-sharded wrapper; a sharded job passes its fused optimizer
        and its rank, and every rank then trains on its own slice of each global batch. `fresh`:
        the model was just initialized (not restored), so its heads start at the base rates."""
        self.model = model
        self.cfg = cfg
        self.opt = optimizer or SplitOptimizer(model, cfg.lr, cfg.embedding_lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.rank = rank
        self.world_size = world_size
        self.windows_trained = 0
        self.fresh = fresh

    def step(self, batch: Batch) -> float:
        self.model.train()
        out = self.model(batch.sparse, batch.dense)
        loss = F.binary_cross_entropy_with_logits(head_logit(out.logits, batch.tenant), batch.label)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def train_window(self, rows: WindowTensors) -> float:
        """cfg.epochs_per_window passes over the window, global batches in a seeded random order.

        A global batch holds batch_size rows per rank; rank r trains on its r-th slice, so every
        rank takes the same number of steps (the collectives of a sharded FM need that). The
        caller pads the window to a multiple of world_size * batch_size (`pad_rows`).
        """
        if self.fresh and self.windows_trained == 0 and self.cfg.base_rate_start:
            self.start_at_base_rates(rows)
        b = self.cfg.batch_size
        features = list(self.model_feature_names)
        starts = list(range(0, rows.num_rows, b * self.world_size))
        losses = []
        for _ in range(self.cfg.epochs_per_window):
            for i in torch.randperm(len(starts), generator=self.gen).tolist():
                lo = starts[i] + self.rank * b
                losses.append(self.step(rows.batch(lo, min(lo + b, rows.num_rows), features)))
        self.windows_trained += 1
        return sum(losses) / max(len(losses), 1)

    @torch.no_grad()
    def start_at_base_rates(self, rows: WindowTensors) -> None:
        """Each tenant head's bias starts at its tenant's positive rate in the first window, as
        the students' do. Every rank holds the whole window, so the dense replicas stay equal."""
        heads = getattr(self.model, "module", self.model).heads
        for h in range(heads.out_features):
            labels = rows.label[rows.tenant == h]
            heads.bias[h] = prior_logit(base_rate(labels))

    @property
    def model_feature_names(self) -> list[str]:
        model = getattr(self.model, "module", self.model)  # DMP wraps the FM in .module
        return model.feature_names

    @torch.no_grad()
    def predict(self, rows: WindowTensors, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """All heads' logits [N, H] and hidden [N, Dh] for every row."""
        self.model.eval()
        logits, hidden = [], []
        for b in rows.batches(batch_size, self.model_feature_names):
            out = self.model(b.sparse, b.dense)
            logits.append(out.logits)
            hidden.append(out.hidden)
        return torch.cat(logits), torch.cat(hidden)


def pad_rows(table: pa.Table, multiple: int) -> pa.Table:
    """Repeat rows from the start so the row count is a multiple of `multiple` (equal rank steps)."""
    missing = -table.num_rows % multiple
    while missing:
        extra = table.slice(0, min(missing, table.num_rows))
        table = pa.concat_tables([table, extra])
        missing -= extra.num_rows
    return table
