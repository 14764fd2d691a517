"""One local Ray for the whole tests/ray tier, started as `exfm serve` starts it (same Serve settings).

Logical CPUs exceed the physical 2 so that a 2-rank FM gang, its supervisor, Data workers,
trainers and Serve replicas can be scheduled together; they time-share the cores.
"""

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve

    from jobs import cluster

    # Short: HAProxy's admin socket path (this folder + a 64-character hash) must stay under 97 characters.
    haproxy = Path(tempfile.mkdtemp(prefix="hap", dir="/tmp"))
    with pytest.MonkeyPatch.context() as env:
        # HAProxy's files default to /tmp/haproxy-serve: keep this cluster's apart from any other.
        env.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(haproxy / "haproxy.cfg"))
        env.setenv("RAY_SERVE_HAPROXY_SOCKET_PATH", str(haproxy / "admin.sock"))
        env.setenv("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", str(haproxy))
        env.setenv("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", str(haproxy / "server-state"))
        for key, value in cluster.FAST_INGRESS_ENV.items():
            env.setenv(key, value)
        # Ray Train's controllers poll their workers every 0.5 s instead of 2: each run's end and each
        # lost worker are seen sooner (the tier starts ~20 runs).
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # Ray Train's preemption watcher (an actor polling for spot-instance notices) has nothing to
        # watch on this machine; its processes took ~35 CPU-seconds of the suite (measured, stop 28).
        env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        cluster.connect(None, num_cpus=8, fast_ingress=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(haproxy, ignore_errors=True)
