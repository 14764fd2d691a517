"""One local Ray for the whole test session (Ray takes seconds to start on 2 cores).

Logical CPUs exceed the physical 2 so that a 2-rank FM gang, its supervisor, Data workers and
trainers can be scheduled together; they time-share the cores.
"""

import pytest
import ray


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(num_cpus=8, include_dashboard=False, namespace="exfm-tests", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
