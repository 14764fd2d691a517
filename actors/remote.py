"""Ray remote wrappers of the leaf actors and tasks: the supervisors start these.

A leaf module: it imports no other module of actors/, so a supervisor can import it at the top
and `launch.py` (which builds the supervisors themselves) is never reached back into.
"""

from __future__ import annotations

import ray


def beside_the_caller():
    """Supervisors hold no resources (num_cpus=0), so Ray may place them on any node, a worker node
    that is lost or drained included (found by killing a student_pool node: the tenant manager had
    landed there and the run died with it). They go where the job that starts them runs: the head
    on a cluster (cluster.yaml); they need no resources, so that node can always take them. So do the
    tasks that only wait on a Ray Train run (its controller is placed beside them)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def shard_actor_class():
    """One rank of the sharded FM (the FM group places and sizes them). Imported here, not at the
    top: a client's `ray.get_actor` of the FM group imports this module, and FMShard brings torch
    and torchrec (the DAS workers' start went from ~1 to ~5 s, measured)."""
    from actors.fm_shard import FMShard

    return ray.remote(FMShard)


def fit_tenant_task():
    """Ray task running one tenant's TorchTrainer.fit() (the trainer's own workers hold the CPUs)."""
    from exfm_ray.tenants.trainer import fit_tenant  # Ray Train: imported only by who starts runs

    return ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=beside_the_caller())(fit_tenant)


def train_fm_task():
    """Ray task running the FM training job (its TorchTrainer workers hold the CPUs/GPUs)."""
    from exfm_ray.fm.train_job import train_fm

    return ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=beside_the_caller())(train_fm)
