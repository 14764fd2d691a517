"""`exfm bench <what>`: parse the flags into the harness's config, join Ray, run, print, write JSON.

The harnesses live in benches/ (one module each: a config, `run(cfg) -> dict`, `summary(r)`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
from pathlib import Path

from exfm_ray.configbase import read_yaml
from exfm_ray.errors import ConfigError
from jobs.settings import Settings

# bench -> (help, flags: (flag, type, default, help), logical CPUs of the local Ray it needs; None: no Ray)
BENCHES = {
    "serve": ("latency and batched throughput: plain FastAPI+uvicorn vs the Ray Serve app", [
        ("--config", Path, None, "ServeConfig YAML for the Serve app (its store_root/port are replaced)"),
        ("--requests", int, 4000, "sequential single-row requests per server"),
        ("--seconds", float, 10.0, "duration of the concurrent load per server"),
        ("--concurrency", int, 32, "concurrent connections under load"),
        ("--rows", int, 32, "rows per request under load (candidates to rank)"),
        ("--tenants", int, 2, "tenants served (beyond 2: copies of the trained students)"),
    ], 2),
    "train": ("tenant training: plain loop vs Ray Train, and 2 tenants at once vs 1", [
        ("--rows-per-window", int, 60_000, "synthetic examples per window"),
        ("--windows", int, 8, "windows each arm trains on, interleaved window by window"),
    ], 2),  # two Ray Train runs of one worker each
    "fm": ("rows/s the FM group labels with 1 and 2 ranks vs the same FM in-process", [
        ("--rows", int, 32_768, "rows labeled per measurement"),
        ("--fm-size", int, 5, "FM size dial"),
    ], 4),  # 2 ranks + supervisor time-share the cores
    "das": ("the DAS (Ray Data + FM group) vs the FM forward in-process, rows/s and ratio", [
        ("--rows", int, 300_000, "examples in the benchmark window"),
        ("--fm-size", int, 5, "FM size dial (the FM is the DAS's expensive part)"),
        ("--shards", int, 2, "FM ranks in the group"),
    ], 4),
    "guard": ("what the guard's student-alone twin costs a tenant: rows/s and memory", [
        ("--windows", int, 6, "windows each arm trains on, interleaved"),
        ("--rows-per-window", int, 40_000, "synthetic examples per window"),
    ], None),
}  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, each against an in-process baseline measured in the same run")
    what = p.add_subparsers(dest="bench", required=True)
    for name, (help_, flags, _) in BENCHES.items():
        q = what.add_parser(name, help=help_)
        q.add_argument("--json", type=Path, help="write the figures to this JSON file")
        for flag, type_, default, flag_help in flags:
            q.add_argument(flag, type=type_, default=default, help=flag_help)
        q.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import ray

    module = importlib.import_module(f"benches.{args.bench}")
    config_cls = next(v for k, v in vars(module).items() if k.endswith("BenchConfig"))
    try:
        cfg = config_cls.parse(_fields(args), source=f"exfm bench {args.bench}")
    except ConfigError as exc:  # name the flag the user typed, not the config field
        raise ConfigError(re.sub(r"field '(\w+)'", lambda m: "--" + m[1].replace("_", "-"), str(exc))) from None
    cpus = BENCHES[args.bench][2]
    if cpus is None:
        results = module.run(cfg)
    else:
        from jobs.cluster import connect
        from jobs.common import quiet_ray_data

        settings = Settings()
        connect(settings.ray_address, num_cpus=cpus, fast_ingress=args.bench == "serve" and settings.serve_fast_ingress)
        quiet_ray_data()
        try:
            results = module.run(cfg)
        finally:
            ray.shutdown()
        if args.bench == "serve":
            results["ray_settings"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
    print(module.summary(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"json: {args.json}")
    return 0


def _fields(args: argparse.Namespace) -> dict:
    """The bench's flags as config fields ('--fm-size' -> fm_size); --config is a ServeConfig YAML."""
    fields = {f.lstrip("-").replace("-", "_"): getattr(args, f.lstrip("-").replace("-", "_"))
              for f, *_ in BENCHES[args.bench][1]}  # fmt: skip
    config = fields.pop("config", None)
    if config is not None:
        # The bench publishes its own students: a placeholder root keeps the YAML's other fields.
        fields["serve"] = {"store_root": ".", **read_yaml(config)}
    return fields
