"""One local Ray for the whole tests/ray tier, started as `exfm serve` starts it (same Serve settings).

Logical CPUs exceed the physical 2 so that a 2-rank FM gang, its supervisor, Data workers,
trainers and Serve replicas can be scheduled together; they time-share the cores.
"""

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.ray_env import TEST_CLUSTER_ENV


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
        for key, value in TEST_CLUSTER_ENV.items():
            env.setenv(key, value)
        cluster.connect(None, num_cpus=8, fast_ingress=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(haproxy, ignore_errors=True)
