"""`exfm serve`: serve every tenant with a published student over HTTP (Ray Serve) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from exfm_ray.configbase import read_yaml
from exfm_ray.errors import ConfigError
from exfm_ray.serving.config import ServeConfig
from jobs.common import curl_example
from jobs.settings import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the published students over HTTP (Ray Serve) until Ctrl-C")
    p.add_argument("--config", type=Path, help="ServeConfig YAML (batching, LRU size, replicas, reload interval)")
    p.add_argument("--store", type=Path, help="StudentStore root to serve from (default EXFM_STORE_ROOT or runs/store)")
    p.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--address", help="Ray cluster to deploy to (default EXFM_RAY_ADDRESS, else a local Ray)")
    p.add_argument("--demo", action="store_true", help="publish synthetic students first if the store has none")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace, settings: Settings) -> ServeConfig:
    data = read_yaml(args.config) if args.config else {}
    data.setdefault("store_root", str(settings.storage))
    for key, value in (("store_root", args.store), ("host", args.host), ("port", args.port)):
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    return ServeConfig.parse(data, source=str(args.config or "exfm serve"))


def run(args: argparse.Namespace) -> int:
    import ray

    from exfm_ray.serving.deploy import deploy, undeploy
    from exfm_ray.students.store import StudentStore
    from jobs.cluster import connect

    settings = Settings()
    cfg = config_from_args(args, settings)
    store = StudentStore(cfg.store_root)
    if args.demo and not store.tenants():
        from exfm_ray.serving.demo import publish_synthetic_students

        published = publish_synthetic_students(cfg.store_root)
        print(f"published demo students: {', '.join(p.tenant for p in published)}")
    tenants = store.tenants()
    if not tenants:
        raise ConfigError(f"no published student under {cfg.store_root}/students (train students, or pass --demo)")
    own = connect(args.address or settings.ray_address, fast_ingress=settings.serve_fast_ingress, serve_port=cfg.port)
    # After ray.init, which installs its own SIGTERM handler (a stack dump and abort).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = deploy(cfg)
        print(f"serving {len(tenants)} tenant(s) ({', '.join(tenants)}) at {url}")
        print(f"API docs: {url}/docs")
        print(f"try:  {curl_example(url, store, tenants[0])}")
        print("Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        undeploy(cfg, all_of_serve=own)
        ray.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
