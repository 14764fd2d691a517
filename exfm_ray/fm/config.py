"""FM sizes and training settings; torch-free, so light processes (Ray Data workers) can read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

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
    base_rate_start: bool = Field(
        True, description="Each tenant head's bias starts at its first window's positive rate (False: PyTorch's init)."
    )

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


ShardingType = Literal["table_wise", "column_wise", "table_column_wise", "data_parallel", "row_wise", "table_row_wise"]
CUDA_ONLY = {"row_wise", "table_row_wise"}


class ShardingConfig(Config):
    backend: Literal["gloo", "nccl"] = Field("gloo", description="Process-group backend: gloo (CPU) or nccl (GPU).")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the FM's shards live.")
    sharding_type: ShardingType | None = Field(
        None, description="Force one sharding type for every table; None lets TorchRec's planner choose."
    )

    @model_validator(mode="after")
    def _check(self) -> ShardingConfig:
        if self.device == "cpu" and self.sharding_type in CUDA_ONLY:
            raise ValueError(
                f"sharding_type {self.sharding_type} needs CUDA (TorchRec offers it only for cuda); "
                "plan it with `exfm plan`, run it on GPUs"
            )
        if self.device == "cpu" and self.backend == "nccl":
            raise ValueError("backend nccl needs device cuda")
        return self
