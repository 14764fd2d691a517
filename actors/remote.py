"""Ray remote wrappers of the leaf actors and tasks: the supervisors start these.

A leaf module: it imports no other module of actors/, so a supervisor can import it at the top
and `launch.py` (which builds the supervisors themselves) is never reached back into.
"""

from __future__ import annotations

import ray

from actors.fm_shard import FMShard


def shard_actor_class():
    """One rank of the sharded FM (the FM group places and sizes them)."""
    return ray.remote(FMShard)


def fit_tenant_task():
    """Ray task running one tenant's TorchTrainer.fit() (the trainer's own workers hold the CPUs)."""
    from exfm_ray.tenants.trainer import fit_tenant  # Ray Train: imported only by who starts runs

    return ray.remote(num_cpus=0, max_retries=0)(fit_tenant)


def train_fm_task():
    """Ray task running the FM training job (its TorchTrainer workers hold the CPUs/GPUs)."""
    from exfm_ray.fm.train_job import train_fm

    return ray.remote(num_cpus=0, max_retries=0)(train_fm)
