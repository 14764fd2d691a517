"""`exfm bench <what>`: parse the flags into the harness's config, join Ray, run, print, write JSON.

The harnesses live in benches/ (one module each: a config, `run(cfg) -> dict`, `summary(r)`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from exfm_ray.configbase import read_yaml
from exfm_ray.errors import ConfigError
from jobs.settings import Settings


class Bench(NamedTuple):
    help: str
    flags: list  # (flag, type, default, help); type bool: --flag / --no-flag
    cpus: int | Callable | None  # logical CPUs of the local Ray it needs (or a function of its config); None: no Ray
    config: str  # its config class in benches/<bench>.py


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


BENCHES = {
    "serve": Bench("latency and batched throughput: plain FastAPI+uvicorn vs the Ray Serve app", [
        ("--config", Path, None, "ServeConfig YAML for the Serve app (its store_root/port are replaced)"),
        ("--requests", int, 4000, "sequential single-row requests per server"),
        ("--seconds", float, 10.0, "duration of the concurrent load per server"),
        ("--concurrency", int, 32, "concurrent connections under load"),
        ("--rows", int, 32, "rows per request under load (candidates to rank)"),
        ("--tenants", int, 2, "tenants served (beyond 2: copies of the trained students)"),
        ("--loopfm-entities", int, 100_000, "users in the LoopFM store of the lookup on/off arm (0: skip it)"),
    ], 2, "ServeBenchConfig"),
    "train": Bench("tenant training: plain loop vs Ray Train, and 2 tenants at once vs 1", [
        ("--rows-per-window", int, 60_000, "synthetic examples per window"),
        ("--windows", int, 8, "windows each arm trains on, interleaved window by window"),
    ], 2, "TrainBenchConfig"),  # two Ray Train runs of one worker each
    "fm": Bench("rows/s the FM group labels with 1 and 2 ranks vs the same FM in-process", [
        ("--rows", int, 32_768, "rows labeled per measurement"),
        ("--fm-size", int, 5, "FM size dial"),
    ], 4, "FMBenchConfig"),  # 2 ranks + supervisor time-share the cores
    "das": Bench("the DAS (Ray Data + FM group) vs the FM forward in-process, rows/s and ratio", [
        ("--rows", int, 300_000, "examples in the benchmark window"),
        ("--fm-size", int, 5, "FM size dial (the FM is the DAS's expensive part)"),
        ("--shards", int, 2, "FM ranks in the group"),
    ], 4, "DasBenchConfig"),
    "guard": Bench("what the guard's student-alone twin costs a tenant: rows/s and memory", [
        ("--windows", int, 6, "windows each arm trains on, interleaved"),
        ("--rows-per-window", int, 40_000, "synthetic examples per window"),
    ], None, "GuardBenchConfig"),
    "tenants": Bench("idle memory/CPU per tenant and commit-to-publish latency as tenants are added, then Serve", [
        ("--counts", _int_list, [1, 2, 4, 8, 16, 32], "tenant counts to measure, comma-separated, in one run"),
        ("--rows-per-window", int, 3000, "synthetic examples per window"),
        ("--max-concurrent", int, 4, "Ray Train runs holding resources at once"),
        ("--tenants-per-run", int, None, "one-worker tenants sharing a run (default: the tenant manager's)"),
        ("--idle-seconds", float, 10.0, "interval over which idle memory and CPU are sampled"),
        ("--serve", bool, True, "serve the largest count with the serve bench at the end"),
        ("--plot", Path, None, "PNG of the curve (default: beside --json, else runs/bench/tenants.png)"),
    ], lambda cfg: max(cfg.max_concurrent, 2), "TenantsBenchConfig"),  # 1 CPU per run; Serve after: 2 x 0.5
    "scale": Bench("per-window time and peak RSS (DAS driver, FM ranks, DAS workers, a trainer) by window size", [
        ("--rows", _int_list, [100_000, 300_000, 1_000_000, 3_000_000], "window sizes (examples), comma-separated"),
        ("--fm-size", int, 2, "FM size dial"),
        ("--workers", int, 2, "DAS workers"),
        ("--train", bool, True, "also train one tenant on each window"),
        ("--das-repeats", int, 2, "rounds of `exfm bench das` for das_ratio (0: skip)"),
        ("--plot", Path, None, "PNG of the curves (default runs/bench/scale.png)"),
    ], 4, "ScaleBenchConfig"),  # 2 FM ranks + DAS workers + the das bench's group
}  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, each against an in-process baseline measured in the same run")
    what = p.add_subparsers(dest="bench", required=True)
    for name, bench in BENCHES.items():
        q = what.add_parser(name, help=bench.help)
        q.add_argument("--json", type=Path, help="write the figures to this JSON file")
        for flag, type_, default, flag_help in bench.flags:
            if type_ is bool:
                q.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=flag_help)
            else:
                q.add_argument(flag, type=type_, default=default, help=flag_help)
        q.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import ray

    bench = BENCHES[args.bench]
    module = importlib.import_module(f"benches.{args.bench}")
    try:
        cfg = getattr(module, bench.config).parse(_fields(args), source=f"exfm bench {args.bench}")
    except ConfigError as exc:  # name the flag the user typed, not the config field
        raise ConfigError(re.sub(r"field '(\w+)'", lambda m: "--" + m[1].replace("_", "-"), str(exc))) from None
    # The tenants bench adds tenants with `exfm tenants add`, as a user would; benches cannot import jobs.
    extra = {"cli": args.exfm} if args.bench == "tenants" else {}
    serves = args.bench in ("serve", "tenants")
    if bench.cpus is None:
        results = module.run(cfg)
    else:
        from jobs.cluster import connect
        from jobs.common import quiet_ray_data

        settings = Settings()
        cpus = bench.cpus(cfg) if callable(bench.cpus) else bench.cpus
        connect(settings.ray_address, num_cpus=cpus, fast_ingress=serves and settings.serve_fast_ingress)
        quiet_ray_data()
        try:
            results = module.run(cfg, **extra)
        finally:
            ray.shutdown()
        if serves:
            results["ray_settings"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
    print(module.summary(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"json: {args.json}")
    if results.get("all_trained_every_window") is False:  # a tenant skipped or repeated a window: a failure
        print("not every tenant trained every window once: see the curve above")
        return 1
    return 0


def _fields(args: argparse.Namespace) -> dict:
    """The bench's flags as config fields ('--fm-size' -> fm_size); --config is a ServeConfig YAML.
    A flag left unset (None) leaves the config's default."""
    fields = {f.lstrip("-").replace("-", "_"): getattr(args, f.lstrip("-").replace("-", "_"))
              for f, *_ in BENCHES[args.bench].flags}  # fmt: skip
    if "plot" in fields and fields["plot"] is None and args.json:
        fields["plot"] = args.json.with_suffix(".png")
    fields = {k: v for k, v in fields.items() if v is not None}
    config = fields.pop("config", None)
    if config is not None:
        # The bench publishes its own students: a placeholder root keeps the YAML's other fields.
        fields["serve"] = {"store_root": ".", **read_yaml(config)}
    return fields
