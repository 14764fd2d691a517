"""`exfm bench <what>`: benchmarks, one sub-command each (serve today; das, train can join the same way)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.settings import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, each against an in-process baseline measured in the same run")
    what = p.add_subparsers(dest="bench", required=True)
    _add_serve(what)
    _add_train(what)
    _add_fm(what)
    _add_das(what)
    _add_guard(what)


def _add_guard(what) -> None:
    p = what.add_parser("guard", help="what the guard's student-alone twin costs a tenant: rows/s and memory")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--windows", type=int, default=6, help="windows each arm trains on, interleaved")
    p.add_argument("--rows-per-window", type=int, default=40_000, help="synthetic examples per window")
    p.set_defaults(run=run_guard)


def run_guard(args: argparse.Namespace) -> int:
    from exfm_ray.bench.guard import GuardBenchConfig, run

    cfg = GuardBenchConfig.parse(
        {"windows": args.windows, "rows_per_window": args.rows_per_window}, source="exfm bench guard"
    )
    r = run(cfg)
    print(
        f"guard off {r['guard_off_rows_per_s']:,.0f} rows/s | guard on {r['guard_on_rows_per_s']:,.0f} rows/s | "
        f"ratio {r['rows_per_s_ratio']:.2f} (median window {r['ratio_median_window']:.2f}) | checkpoint "
        f"{r['state_bytes_guard_off'] / 1e6:.2f} -> {r['state_bytes_guard_on'] / 1e6:.2f} MB ({r['state_ratio']:.2f}x)"
    )
    _write_json(args.json, r)
    return 0


def _add_fm(what) -> None:
    p = what.add_parser("fm", help="rows/s the FM group labels with 1 and 2 ranks vs the same FM in-process")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--rows", type=int, default=32_768, help="rows labeled per measurement")
    p.add_argument("--fm-size", type=int, default=5, help="FM size dial")
    p.set_defaults(run=run_fm)


def _add_das(what) -> None:
    p = what.add_parser("das", help="the DAS (Ray Data + FM group) vs the FM forward in-process, rows/s and ratio")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--rows", type=int, default=300_000, help="examples in the benchmark window")
    p.add_argument("--fm-size", type=int, default=5, help="FM size dial (the FM is the DAS's expensive part)")
    p.add_argument("--shards", type=int, default=2, help="FM ranks in the group")
    p.set_defaults(run=run_das)


def run_fm(args: argparse.Namespace) -> int:
    from jobs.bench_fm import FMBenchConfig, run_fm_bench
    from jobs.cluster import connect

    cfg = FMBenchConfig.parse({"rows": args.rows, "fm_size": args.fm_size}, source="exfm bench fm")
    connect(Settings().ray_address, num_cpus=4)  # 2 ranks + supervisor time-share the cores
    results = run_fm_bench(cfg)
    _write_json(args.json, results)
    return 0


def run_das(args: argparse.Namespace) -> int:
    from jobs.augment_cmd import quiet_ray_data
    from jobs.bench_das import DasBenchConfig, run_das_bench
    from jobs.cluster import connect

    cfg = DasBenchConfig.parse(
        {"rows": args.rows, "fm_size": args.fm_size, "shards": args.shards}, source="exfm bench das"
    )
    connect(Settings().ray_address, num_cpus=4)
    quiet_ray_data()
    results = run_das_bench(cfg)
    print(
        f"in-process FM forward {results['inprocess_rows_per_s']:,.0f} rows/s | DAS {results['das_rows_per_s']:,.0f} "
        f"rows/s | ratio {results['ratio']:.2f} | window {results['unique_examples']:,} examples | fixed overhead "
        f"{results['das_fixed_overhead_s']:.2f} s ({results['overhead_window_examples']:,}-example window)"
    )
    _write_json(args.json, results)
    return 0


def _add_train(what) -> None:
    p = what.add_parser("train", help="tenant training: plain loop vs Ray Train, and 2 tenants at once vs 1")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    p.add_argument("--rows-per-window", type=int, default=60_000, help="synthetic examples per window")
    p.add_argument("--windows", type=int, default=8, help="windows each arm trains on, interleaved window by window")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from exfm_ray.errors import ConfigError
    from jobs.bench_train import BENCH_CPUS, run_train_bench
    from jobs.cluster import connect

    if args.windows < 2 or args.rows_per_window < 1000:
        raise ConfigError("--windows must be >= 2 and --rows-per-window >= 1000")
    connect(Settings().ray_address, num_cpus=BENCH_CPUS)
    results = run_train_bench(rows_per_window=args.rows_per_window, windows=args.windows)
    print(
        f"| plain loop | Ray Train | ratio | median window ratio | 1 tenant | 2 tenants | scaling | "
        f"2 bare processes | machine scaling |\n"
        f"|---|---|---|---|---|---|---|---|---|\n"
        f"| {results['plain_rows_per_s']:,.0f} rows/s | {results['ray_rows_per_s']:,.0f} rows/s | "
        f"{results['ratio']:.2f} | {results['ratio_median_window']:.2f} | "
        f"{results['one_tenant_rows_per_s']:,.0f} rows/s | "
        f"{results['two_tenants_rows_per_s']:,.0f} rows/s | {results['scaling']:.2f} | "
        f"{results['bare_pair_rows_per_s']:,.0f} rows/s | {results['machine_scaling']:.2f} |"
    )
    _write_json(args.json, results)
    return 0


def _write_json(path: Path | None, results: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"json: {path}")


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
    _write_json(args.json, results)
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
