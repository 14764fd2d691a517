"""What every Ray Train run of ours (the FM training job, the tenant runs) is built with.

Ray Train 2.60 starts, for each run, a DatasetManager actor to hand Ray Datasets to the workers,
whether or not the run has any. Ours read their windows straight from Parquet (one Ray Dataset
stream cannot feed several trainers), so that actor is a Python process importing ray.train and
ray.data (~4 CPU-s here) that nothing ever calls, started again with every worker group: each
tenant run, each restart after a lost worker, each FM job. `torch_trainer` builds a TorchTrainer
without it when the run passes no datasets; everything else (controller, placement-group cleaner,
failure handling) is Ray's own.
"""

from __future__ import annotations

from typing import Any


def torch_trainer(train_loop, **kwargs: Any):
    """A `ray.train.torch.TorchTrainer(train_loop, **kwargs)` that starts no dataset actor when
    `datasets` is empty."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class DatalessTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return DatalessTorchTrainer(train_loop, **kwargs)


def allreduce_mean_grads(params: list) -> None:
    """Average gradients over a data-parallel run's workers (a tenant's student), as one flat all-reduce."""
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p).clone()
