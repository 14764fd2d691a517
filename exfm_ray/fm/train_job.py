"""The FM training job: Ray Train TorchTrainer + TorchRec DMP, publishing versioned checkpoints.

Each run trains the current FM version (or a fresh FM) on the stream windows after its
watermark, up to `through_window`, on the union of all tenants, with the same sharding code as
the FM group and the same FMLearner as the in-process experiment, then saves a DCP checkpoint
(every rank writes its shards) and publishes it in the registry with its data watermark.

- Following the stream (`follow`): the job waits for each next window to appear in the stream
  and publishes a version per window, until `through_window` (None: for ever).
- Published versions are never written again: a version's name is taken from the registry when it
  is published (not reserved at launch), and a run restarted by Ray Train (a lost worker) resumes
  after the newest version it, or an earlier run, published instead of retraining into it.
"""

from __future__ import annotations

import time

from pydantic import Field, model_validator

from exfm_ray.configbase import Config
from exfm_ray.fm.config import FMConfig, ShardingConfig
from exfm_ray.fm.registry import FMRegistry, FMVersion


class FMTrainConfig(Config):
    storage: str = Field(description="Storage root: the FM registry lives under <storage>/fm.")
    stream: str = Field(description="Stream folder (spec.json + window=<t>/ Parquet partitions).")
    through_window: int | None = Field(
        None, ge=0, description="Train on windows up to and including this one; None: follow the stream for ever."
    )
    follow: bool = Field(False, description="Wait for windows not in the stream yet (a version per window).")
    poll_s: float = Field(2.0, gt=0, description="How often a following job looks for the next window.")
    fm: FMConfig = Field(default_factory=FMConfig, description="FM sizes and optimizer settings.")
    sharding: ShardingConfig = Field(default_factory=ShardingConfig, description="Backend and sharding type.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers = FM ranks in the job.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    incremental: bool = Field(True, description="Continue from the current version instead of retraining.")
    seed: int = Field(0, description="Seed of initialization and batch order.")
    max_failures: int = Field(1, ge=0, description="Worker failures Ray Train recovers from (restarts the run).")
    publish_each_window: bool = Field(
        False,
        description="Publish a version after every window (a streaming FM: the DAS of window t+1 can start "
        "as soon as window t is trained), instead of one version at the end.",
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description='Custom resources per worker, e.g. {"fm_shard": 1} for FM nodes.'
    )

    @model_validator(mode="after")
    def _bounded(self) -> FMTrainConfig:
        if self.through_window is None and not self.follow:
            raise ValueError("through_window is required unless follow is set")
        return self


def train_loop(config: dict) -> dict:
    """Runs on every Ray Train worker; rank 0 returns the published version's metadata."""
    import torch
    import torch.distributed as dist

    from exfm_ray.data.batching import WindowTensors
    from exfm_ray.data.stream import read_spec, read_window, window_ready
    from exfm_ray.errors import DataError
    from exfm_ray.fm.learner import FMLearner, pad_rows
    from exfm_ray.fm.model import build_fm
    from exfm_ray.fm.sharding import dense_optimizer, load_checkpoint, plan_summary, shard

    cfg = FMTrainConfig.model_validate(config["cfg"])
    run, base = config["run"], config["base"]
    registry = FMRegistry(cfg.storage)
    newest = registry.current()
    if newest is not None and newest.run == run:  # restarted after a lost worker: go on after it
        base = newest.model_dump(mode="json")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    spec = read_spec(cfg.stream)
    model = shard(build_fm(spec, cfg.fm, device="meta"), cfg.sharding, embedding_lr=cfg.fm.embedding_lr)
    if base is not None:
        load_checkpoint(model, base["path"])
    else:
        # Re-seed here: sharding initialized each rank's own tables, which drew different amounts
        # from the generator on each rank. Dense replicas that start apart never meet again (DDP
        # averages gradients, not weights), and the checkpoint would pair rank 0's dense layers
        # with tables trained through every rank's (measured: NE 1.69 vs 0.96 with one rank).
        torch.manual_seed(cfg.seed)
        model.module.reset_dense_parameters()
    learner = FMLearner(
        model,
        cfg.fm,
        seed=cfg.seed,
        optimizer=dense_optimizer(model, cfg.fm.lr),
        rank=rank,
        world_size=world,
        fresh=base is None,
    )
    t = base["through_window"] + 1 if base is not None else 0
    losses, watermark = {}, base["watermark"] if base is not None else -1
    published = None
    while cfg.through_window is None or t <= cfg.through_window:
        if not window_ready(cfg.stream, t):
            if not cfg.follow:
                raise DataError(f"window {t} not found under {cfg.stream}")
            time.sleep(cfg.poll_s)
            continue
        table = read_window(cfg.stream, t, spec)
        watermark = max(watermark, int(table.column("event_time").to_numpy().max()))
        rows = WindowTensors(pad_rows(table, world * cfg.fm.batch_size), spec)
        losses[t] = learner.train_window(rows)
        if cfg.publish_each_window or cfg.follow or t == cfg.through_window:
            meta = FMVersion(
                version=_next_version(registry, rank),
                path="",
                watermark=watermark,
                through_window=t,
                spec=spec,
                fm=cfg.fm,
                plan={name: p["sharding_type"] for name, p in plan_summary(model.plan).items()},
                metrics={
                    **{f"loss_window_{w}": loss for w, loss in losses.items()},
                    "dense_replica_gap": _dense_replica_gap(model),
                },
                run=run,
            )
            published = _save_and_publish(model, meta, cfg.storage, rank)
        t += 1
    return published.model_dump(mode="json") if published is not None and rank == 0 else {}


def _next_version(registry: FMRegistry, rank: int) -> str:
    """The next free name, as rank 0 reads the registry now, the same on every rank."""
    import torch.distributed as dist

    name = [registry.next_version() if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def _dense_replica_gap(model) -> float:
    """Largest difference between ranks of a fingerprint of the data-parallel (dense) weights:
    0 when the replicas agree, as they must for the checkpoint (rank 0's copy) to be right."""
    import torch
    import torch.distributed as dist

    dense = [p.detach().reshape(-1) for n, p in model.named_parameters() if ".ebc." not in f".{n}"]
    flat = torch.cat(dense).double()
    mine = torch.stack([flat.sum(), flat.norm(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum()])
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return float(max((e - every[0]).abs().max() for e in every))


def _save_and_publish(model, meta: FMVersion, storage: str, rank: int) -> FMVersion:
    """Every rank writes its shards; rank 0 publishes once all are on storage."""
    import torch.distributed as dist

    from exfm_ray.fm.sharding import save_checkpoint

    path = FMRegistry(storage).version_dir(meta.version)
    save_checkpoint(model, path)
    dist.barrier()
    meta = meta.replace(path=str(path))
    if rank == 0:
        FMRegistry(storage).publish(meta)
    return meta


def train_fm(cfg: FMTrainConfig, *, run_name: str | None = None) -> FMVersion | None:
    """Launch the TorchTrainer and wait; returns the new version (None: already up to date)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from exfm_ray.train_runs import torch_trainer

    registry = FMRegistry(cfg.storage)
    base = registry.current() if cfg.incremental else None
    if base is not None and cfg.through_window is not None and base.through_window >= cfg.through_window:
        return None
    run = run_name or f"fm-train-{int(time.time() * 1000)}"
    trainer = torch_trainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "run": run,
            "base": base.model_dump(mode="json") if base is not None else None,
        },
        torch_config=TorchConfig(backend=cfg.sharding.backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker},
        ),
        run_config=RunConfig(
            name=run,
            storage_path=f"{cfg.storage}/ray-train",
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    return FMVersion.model_validate(result.return_value) if result.return_value else None
