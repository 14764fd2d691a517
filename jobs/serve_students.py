"""Deploy the student service to a running cluster, for `ray job submit`; the app outlives the job.

    RAY_SERVE_ENABLE_HA_PROXY=1 ... ray start --head          # Serve settings: see jobs/cluster.py
    ray job submit --working-dir . -- python -m jobs.serve_students --config my_serve.yaml

`--config` is a ServeConfig YAML; `--store` overrides its store_root (a path every node mounts).
Stop it with `serve delete students` (or `serve shutdown`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exfm_ray.errors import ExfmError
from jobs.serve_cmd import config_from_args
from jobs.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.serve_students", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="ServeConfig YAML")
    parser.add_argument("--store", type=Path, help="StudentStore root (overrides the YAML)")
    args = parser.parse_args(argv)
    args.host = args.port = None
    settings = Settings()
    try:
        cfg = config_from_args(args, settings)
    except ExfmError as exc:
        print(f"serve_students: error: {exc}", file=sys.stderr)
        return 2

    import ray

    from exfm_ray.serving.deploy import deploy
    from jobs.cluster import try_connect

    if not try_connect(settings.ray_address):  # inside `ray job submit` RAY_ADDRESS names the cluster
        print("serve_students: error: no running Ray cluster to deploy to", file=sys.stderr)
        return 2
    try:
        print(f"deployed: {deploy(cfg)}")
    finally:
        ray.shutdown()  # disconnect only: Serve keeps the application running
    return 0


if __name__ == "__main__":
    sys.exit(main())
