"""Optimizers shared by FM and students: Adagrad on embedding tables, Adam on dense layers.

This mirrors what the sharded path does on GPUs (fused row-wise Adagrad inside the embedding
kernels, Adam for the data-parallel dense part), so both paths train the same way.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection


class SplitOptimizer:
    """Adagrad for EmbeddingBagCollection tables, Adam for everything else."""

    def __init__(self, model: nn.Module, dense_lr: float, embedding_lr: float, exclude: set[int] | None = None):
        exclude = exclude or set()
        emb_ids = {id(p) for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()}
        emb = [p for p in model.parameters() if id(p) in emb_ids and id(p) not in exclude]
        dense = [p for p in model.parameters() if id(p) not in emb_ids and id(p) not in exclude]
        self.optimizers = []
        if emb:
            self.optimizers.append(torch.optim.Adagrad(emb, lr=embedding_lr))
        if dense:
            self.optimizers.append(torch.optim.Adam(dense, lr=dense_lr))

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)
