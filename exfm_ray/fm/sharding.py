"""The only module that knows TorchRec planners, sharders, DistributedModelParallel and DCP.

The FM is built on `meta`, planned collectively (rank 0 plans, everyone receives the plan),
sharded with DMP, and loaded from a torch.distributed.checkpoint folder. DCP checkpoints are
reshardable: one saved by an unsharded model, or by a 2-rank table-wise job, loads into any
other sharding. The process-group backend is configuration (gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from exfm_ray.fm.config import ShardingConfig
from exfm_ray.fm.model import FoundationModel


def shard(
    model: FoundationModel,
    cfg: ShardingConfig,
    pg: dist.ProcessGroup | None = None,
    *,
    embedding_lr: float | None = None,
) -> DistributedModelParallel:
    """Shard a (meta-device) FM over the process group. With embedding_lr, the tables train with
    fused row-wise Adagrad inside the embedding kernels (set before sharding, as TorchRec requires)."""
    pg = pg or dist.GroupMember.WORLD
    device = torch.device(cfg.device, torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    if embedding_lr is not None:
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

        apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": embedding_lr})
    sharders = [EmbeddingBagCollectionSharder()]
    constraints = None
    if cfg.sharding_type is not None:
        constraints = {
            t.name: ParameterConstraints(sharding_types=[cfg.sharding_type]) for t in model.ebc.embedding_bag_configs()
        }
    world = dist.get_world_size(pg)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world, local_world_size=world if cfg.device == "cpu" else None),
        kernel_config=KernelConfig(compute_device=cfg.device),
    )
    # The default heuristic reservation over-counts the dense part; a fixed share is predictable.
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(0.15),
        debug=False,
    )
    plan = planner.collective_plan(model, sharders, pg)
    # TorchRec wraps the dense part in DDP with static_graph=True by default; with our FM that
    # all-reduced no gradient at all (ranks' dense layers drifted apart: see the FM job's
    # dense_replica_gap metric). Plain DDP synchronizes every step.
    return DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False),
    )


def plan_summary(plan: ShardingPlan) -> dict[str, dict]:
    """{table: {"sharding_type": ..., "ranks": [...]}} for checkpoint metadata and status."""
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            out[table] = {"sharding_type": ps.sharding_type, "ranks": list(ps.ranks or [])}
    return out


def dense_optimizer(model: DistributedModelParallel, lr: float) -> CombinedOptimizer:
    """Fused row-wise Adagrad on the sharded tables (already inside the kernels) + Adam on the rest."""
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    adam = KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adam(params, lr=lr))
    return CombinedOptimizer([model.fused_optimizer, adam])


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Collective when sharded: every rank writes its own shards."""
    dcp.save(model.state_dict(), checkpoint_id=str(path))


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a DCP checkpoint into any sharding (or none); collective when sharded. Weights only:
    the checkpoint folder sits in shared storage, so nothing in it may run code here."""
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()  # a refused file fails here, plainly (DCP wraps errors in a BaseException)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(path), storage_reader=reader)
    model.load_state_dict(state)


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    *((_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                         "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes its `.metadata` with pickle and its FileSystemReader reads it with a bare
    `pickle.load`: a file anyone wrote there would run code. Only the classes of DCP's own
    metadata (and torch dtypes) come back; anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"DCP checkpoint metadata refers to {module}.{name}: refused (weights only)")


class SafeFileSystemReader(dcp.FileSystemReader):
    """A FileSystemReader that loads tensors only: restricted unpickling of `.metadata`, and no
    non-tensor entries (DCP reads those with `torch.load(weights_only=False)`; the FM has none)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{self.path}: .metadata holds {type(metadata).__name__}, not DCP Metadata")
        other = sorted(k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata))
        if other:
            raise pickle.UnpicklingError(f"{self.path}: non-tensor entries refused (weights only): {other[:5]}")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
