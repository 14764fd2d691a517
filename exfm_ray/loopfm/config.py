"""A student's LoopFM settings, apart from the tower: a config (the CLI's, a tenant's) is read
without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from exfm_ray.configbase import Config
from exfm_ray.loopfm.store import StoreConfig

Pooling = Literal["mean", "last", "sum", "attention"]


class LoopFMConfig(Config):
    store: StoreConfig = Field(default_factory=StoreConfig, description="Which entities, how much history, how big.")
    pooling: Pooling = Field("mean", description="How a key's K embeddings become one vector.")
