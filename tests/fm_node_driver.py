"""A driver on a multi-node test cluster for the FM-node kill test (tests/ray/test_multinode.py):
starts an FM group whose ranks need the `fm_node` resource, prints READY with the ranks' nodes,
waits for the test's GO file, augments window 1 and prints the outcome as JSON.

Usage: python tests/fm_node_driver.py STORAGE GCS_ADDRESS MAX_WAIT_S
"""

import json
import sys
import time
from pathlib import Path

import ray

from actors.fm_group import FMGroupConfig
from actors.launch import start_fm_group, stop_fm_group
from exfm_ray.das.pipeline import AugmentConfig, augment_windows

GROUP = "fm-node-kill"


def _rank_nodes() -> list[str]:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("class_name", "=", "FMShard"), ("state", "=", "ALIVE")], detail=True)
    return sorted(a.node_id for a in alive if any(k.startswith("fm_node") for k in a.required_resources or {}))


def main(storage: Path, address: str, max_wait_s: float) -> None:
    ray.init(address=address, log_to_driver=False)
    cfg = FMGroupConfig(name=GROUP, storage=str(storage), num_shards=2, threads_per_shard=1,
                        shard_resources={"fm_node": 1}, call_timeout_s=20)  # fmt: skip
    group = start_fm_group(cfg, detached=False)
    print("READY", json.dumps(_rank_nodes()), flush=True)
    while not (storage / "GO").exists():
        time.sleep(0.2)
    # The DAS workers on the worker nodes, as `das_resources` puts them on a cluster: unpinned, one could
    # take a CPU of the FM node that joins (it did, once: the group's two bundles then never fit there).
    das = AugmentConfig(storage=str(storage), stream=str(storage / "stream"), group_name=GROUP, batch_size=500,
                        unit_rows=1000, workers=2, worker_resources={"student_pool": 0.1},
                        max_wait_s=max_wait_s)  # fmt: skip
    [result] = augment_windows(das, [1])
    status = ray.get(group.status.remote())
    out = {"status": result["status"], "record": result["record"].model_dump(mode="json"),
           "rebuilds": status.gangs[0].rebuilds, "gang": status.gangs[0].status}  # fmt: skip
    if status.gangs[0].status == "ready":
        out["rank_nodes"] = _rank_nodes()
    print("RESULT", json.dumps(out), flush=True)
    stop_fm_group(GROUP)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
