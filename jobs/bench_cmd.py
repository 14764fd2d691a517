"""`exfm bench <what>`: benchmarks, one sub-command each (serve today; das, train can join the same way)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.settings import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (serve: Ray Serve vs plain uvicorn)")
    what = p.add_subparsers(dest="bench", required=True)
    _add_serve(what)


def _add_serve(what) -> None:
    p = what.add_parser("serve", help="latency and batched throughput: plain FastAPI+uvicorn vs the Ray Serve app")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--config", type=Path, help="ServeConfig YAML for the Serve app (its store_root/port are replaced)")
    p.add_argument("--requests", type=int, default=4000, help="sequential single-row requests per server")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of the concurrent load per server")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent connections under load")
    p.add_argument("--rows", type=int, default=32, help="rows per request under load (candidates to rank)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from exfm_ray.errors import ConfigError
    from jobs.bench_serve import run_serve_bench

    for name in ("requests", "concurrency", "rows"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    if args.seconds <= 0:
        raise ConfigError("--seconds must be > 0")
    config = None
    if args.config:
        config = _config_from_yaml(args.config)
    results = run_serve_bench(
        requests=args.requests,
        seconds=args.seconds,
        concurrency=args.concurrency,
        rows=args.rows,
        fast_ingress=Settings().serve_fast_ingress,
        config=config,
    )
    print(_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"json: {args.json}")
    return 0


def _config_from_yaml(path: Path):
    from exfm_ray.serving.config import ServeConfig
    from jobs.serve_cmd import load_yaml

    # The bench publishes its own students: a placeholder root keeps the YAML's other fields.
    return ServeConfig.parse({"store_root": ".", **load_yaml(path)}, source=str(path))


def _table(r: dict) -> str:
    lines = [
        "| | baseline (uvicorn) | Ray Serve | ratio |",
        "|---|---|---|---|",
        f"| p50, sequential 1-row | {r['baseline_p50_ms']} ms | {r['serve_p50_ms']} ms | {r['p50_ratio']} |",
        f"| p99, sequential 1-row | {r['baseline_p99_ms']} ms | {r['serve_p99_ms']} ms | {r['p99_ratio']} |",
        f"| predictions/s, {r['concurrency']} conns x {r['rows_per_request']} rows | "
        f"{r['baseline_predictions_per_s']} | {r['batched_predictions_per_s']} | |",
    ]
    return "\n".join(lines)
