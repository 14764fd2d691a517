"""`exfm serve`: serve every tenant with a published student over HTTP (Ray Serve) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import time
from pathlib import Path

from exfm_ray.errors import ConfigError
from exfm_ray.serving.config import ServeConfig
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
    data = load_yaml(args.config) if args.config else {}
    data.setdefault("store_root", str(settings.storage))
    for key, value in (("store_root", args.store), ("host", args.host), ("port", args.port)):
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    return ServeConfig.parse(data, source=str(args.config or "exfm serve"))


def run(args: argparse.Namespace) -> int:
    from exfm_ray.students.store import StudentStore
    from jobs import serving

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
    address = args.address or settings.ray_address
    serving.start_ray(address, fast_ingress=settings.serve_fast_ingress)
    # After ray.init, which installs its own SIGTERM handler (a stack dump and abort).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = serving.deploy(cfg)
        print(f"serving {len(tenants)} tenant(s) ({', '.join(tenants)}) at {url}")
        print(f"API docs: {url}/docs")
        print(f"try:  {curl_example(url, store, tenants[0])}")
        print("Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        serving.shutdown(cfg, own_cluster=address is None)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def curl_example(url: str, store, tenant: str) -> str:
    from exfm_ray.serving.demo import example_rows

    body = json.dumps({"rows": example_rows(store.latest_meta(tenant), 1)})
    return (
        f"curl -s -X POST {url}/v1/tenants/{tenant}/predict -H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def load_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of ServeConfig fields")
    return data
