"""Ray Train settings of both test clusters (the tier's shared Ray and the multi-node cluster). Each
raylet's workers read them from the environment: set them before a cluster starts."""

TEST_CLUSTER_ENV = {
    # Controllers poll their workers every 0.5 s instead of 2: each run's end and each lost worker
    # are seen sooner (the suite starts 17 runs).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # The preemption watcher (an actor polling for spot-instance notices) has nothing to watch on this
    # machine; its 11 processes took 39 CPU-seconds of the suite (measured, stop 28).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # No usage reporting from a test cluster (no network to send it to): Ray Data would otherwise start a
    # detached actor per cluster to collect it, one more process importing ray.data.
    "RAY_USAGE_STATS_ENABLED": "0",
}
