"""FM sizes and training settings; torch-free, so light processes (Ray Data workers) can read it."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from exfm_ray.configbase import Config


class FMConfig(Config):
    size: int = Field(3, ge=1, le=10, description="Capacity dial: derives every size below that is left unset.")
    embedding_dim: int | None = Field(None, gt=0, description="Embedding dim D; default 4 * 2**size, max 128.")
    num_cross_layers: int | None = Field(None, ge=0, description="DCNv2 cross layers; default 1 + size // 2.")
    cross_low_rank: int | None = Field(None, gt=0, description="Rank of each cross layer; default 4 * size.")
    hidden: list[int] | None = Field(None, description="Deep MLP widths; default [64*size, 32*size].")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the dense layers.")
    embedding_lr: float = Field(0.05, gt=0, description="Adagrad learning rate of the embedding tables.")
    epochs_per_window: int = Field(
        2, ge=1, description="Passes over each new window: the external FM has its own compute budget."
    )
    batch_size: int = Field(256, gt=0, description="FM training batch size.")

    def resolved(self) -> ResolvedFMSizes:
        s = self.size
        return ResolvedFMSizes(
            embedding_dim=self.embedding_dim or min(4 * 2**s, 128),
            num_cross_layers=self.num_cross_layers if self.num_cross_layers is not None else 1 + s // 2,
            cross_low_rank=self.cross_low_rank or 4 * s,
            hidden=list(self.hidden or [64 * s, 32 * s]),
        )


@dataclass(frozen=True)
class ResolvedFMSizes:
    embedding_dim: int
    num_cross_layers: int
    cross_low_rank: int
    hidden: list[int]
