"""The foundation model (FM): big, multi-tenant, trained on the union of all tenants' traffic.

Architecture: EmbeddingBagCollection over every sparse feature -> [F+1, D] (dense features are
projected to one more D-vector) -> DCNv2 low-rank cross layers on the flattened [(F+1) * D]
input -> deep MLP -> hidden representation h (LoopFM stores it) -> one linear head per tenant task.

The module builds on any device, including `meta`, so the sharding code can plan and shard a
model far larger than host memory; only `ebc` is sharded, the rest is data-parallel.
Shape letters: B batch, F sparse features, D embedding dim, H heads, Dh hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.mlp import MLP

from exfm_ray.fm.config import FMConfig
from exfm_ray.schema import StreamSpec


@dataclass
class FMOutput:
    """logits [B, H] (one column per head) and hidden [B, Dh] (the FM embedding)."""

    logits: torch.Tensor
    hidden: torch.Tensor


def fm_tables(spec: StreamSpec, embedding_dim: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=f"t_{f.name}",
            embedding_dim=embedding_dim,
            num_embeddings=f.cardinality,
            feature_names=[f.name],
            pooling=PoolingType.MEAN if f.multi_valued else PoolingType.SUM,
        )
        for f in spec.sparse
    ]


class FoundationModel(nn.Module):
    """The FM. Build with `build_fm(spec, cfg)` or directly from table configs (for planning).

    Args:
        tables: one EmbeddingBagConfig per sparse feature, all of dim D.
        num_dense: number of dense features Dn.
        heads: head names (one per tenant task), the order of the logit columns.
        cfg: FMConfig.
        device: where parameters live (`meta` for planning/sharding).
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        num_dense: int,
        heads: list[str],
        cfg: FMConfig,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        sizes = cfg.resolved()
        device = torch.device(device or "cpu")
        assert all(t.embedding_dim == sizes.embedding_dim for t in tables)
        self.feature_names = [n for t in tables for n in t.feature_names]
        self.head_names = list(heads)
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        d = sizes.embedding_dim
        num_vectors = len(self.feature_names) + 1
        in_features = num_vectors * d
        self.num_pairs = num_vectors * (num_vectors - 1) // 2
        with device:
            self.dense_proj = nn.Linear(max(num_dense, 1), d)
            self.cross = LowRankCrossNet(in_features, sizes.num_cross_layers, sizes.cross_low_rank)
            self.deep = MLP(in_features + self.num_pairs, sizes.hidden)
            self.heads = nn.Linear(sizes.hidden[-1], len(heads))
        self.num_dense = num_dense

    @torch.no_grad()
    def reset_dense_parameters(self) -> None:
        """Initialize every non-embedding weight in place.

        A model built on `meta` and sharded by DMP gets its dense weights materialized, but DMP
        calls reset_parameters() only on modules that define it, and LowRankCrossNet keeps its
        kernels in ParameterLists that do not: they would hold uninitialized memory (NaN). A fresh
        sharded FM calls this once, with the same seed on every rank.
        """
        for module in (self.dense_proj, self.deep, self.heads):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    sub.reset_parameters()
        for w in [*self.cross.W_kernels, *self.cross.V_kernels]:
            nn.init.xavier_normal_(w)
        for b in self.cross.bias:
            nn.init.zeros_(b)

    @property
    def hidden_dim(self) -> int:
        return self.heads.in_features

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> FMOutput:
        pooled = self.ebc(sparse)
        embs = [pooled[name] for name in self.feature_names]  # F x [B, D]
        if self.num_dense == 0:
            dense = torch.zeros(dense.shape[0], 1, device=dense.device)
        vectors = torch.stack([*embs, self.dense_proj(dense)], dim=1)  # [B, F+1, D]
        x0 = vectors.flatten(1)  # [B, (F+1) * D]
        hidden = self.deep(torch.cat([self.cross(x0), pairwise_dots(vectors)], dim=1))  # [B, Dh]
        return FMOutput(self.heads(hidden), hidden)


def pairwise_dots(vectors: torch.Tensor) -> torch.Tensor:
    """DLRM-style interaction: dot products of every pair of feature vectors, [B, V, D] -> [B, V(V-1)/2].

    Rank-D user x ad affinities are dot products, which an MLP learns slowly; this hands them over.
    """
    gram = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, V, V]
    i, j = torch.triu_indices(vectors.shape[1], vectors.shape[1], offset=1, device=vectors.device)
    return gram[:, i, j]


def build_fm(spec: StreamSpec, cfg: FMConfig, device: torch.device | str | None = None) -> FoundationModel:
    tables = fm_tables(spec, cfg.resolved().embedding_dim)
    return FoundationModel(tables, len(spec.dense), spec.tenant_names, cfg, device)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
