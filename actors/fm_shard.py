"""One rank of the sharded FM: joins the process group, holds its shards, runs forward in lockstep.

A plain class; `actors/launch.py` makes it a Ray actor. Every method that touches the model is a
collective, so the supervisor must call all ranks in the same order (it does: it submits one
call to every rank before the next, and a Ray actor runs one caller's calls in order).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from exfm_ray.data.batching import WindowTensors
from exfm_ray.fm.config import ShardingConfig
from exfm_ray.fm.model import build_fm
from exfm_ray.fm.registry import FMVersion
from exfm_ray.fm.sharding import load_checkpoint, plan_summary, shard


class FMShard:
    def __init__(self, rank: int, world_size: int, threads: int = 1):
        self.rank = rank
        self.world_size = world_size
        torch.set_num_threads(max(1, threads))
        self.model = None
        self.version: FMVersion | None = None
        self.sharding: ShardingConfig | None = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process-group rendezvous."""
        ip = _node_ip()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def setup(self, master: tuple[str, int], version: dict, sharding: dict, timeout_s: float) -> dict:
        """Join the process group, shard the FM of `version` and load its weights."""
        self.sharding = ShardingConfig.model_validate(sharding)
        addr, port = master
        # A collective blocked on a dead peer fails after timeout_s instead of hanging forever.
        dist.init_process_group(
            self.sharding.backend,
            init_method=f"tcp://{addr}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        return self.load(version)

    def load(self, version: dict) -> dict:
        """Switch to another FM version; re-shards only if the model's shape changed."""
        meta = FMVersion.model_validate(version)
        same_shape = self.version is not None and (meta.spec, meta.fm) == (self.version.spec, self.version.fm)
        if not same_shape:
            assert self.sharding is not None
            self.model = shard(build_fm(meta.spec, meta.fm, device="meta"), self.sharding)
        load_checkpoint(self.model, meta.path)
        self.model.eval()
        self.version = meta
        return self.info()

    @torch.no_grad()
    def forward(self, chunk: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Logits [B, H] and hidden [B, Dh] for this rank's chunk (already validated)."""
        assert self.model is not None and self.version is not None
        rows = WindowTensors(chunk, self.version.spec)
        batch = rows.batch(0, rows.num_rows, self.version.spec.sparse_names)
        out = self.model(batch.sparse, batch.dense)
        return out.logits.numpy(), out.hidden.numpy()

    def info(self) -> dict:
        plan = plan_summary(self.model.plan) if self.model is not None else {}
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "version": self.version.version if self.version else None,
            "plan": {t: p["sharding_type"] for t, p in plan.items()},
        }


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
