"""`exfm plan`: plan the FM's sharding for a GPU cluster, on paper, from this machine (TorchRec planner, dry run)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="plan the FM's sharding on a simulated GPU cluster (TorchRec planner, no GPU needed)",
        description="Lay out embedding tables for --fm-params parameters (or read --tables), build the FM on the "
        "meta device and run TorchRec's sharding planner for --gpus GPUs of --hbm-gb HBM. Prints per-rank memory, "
        "the sharding types chosen and whether it fits. GB = 2**30 bytes.",
    )
    p.add_argument("--fm-params", type=float, help="FM size in parameters, e.g. 1e12 (or give --tables)")
    p.add_argument("--tables", type=Path, help="YAML/JSON list of tables {name, rows, dim} instead of --fm-params")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--hbm-gb", type=float, required=True, help="HBM per GPU in GB, e.g. 80")
    p.add_argument(
        "--ddr-gb", type=float, default=0, help="host memory per GPU for UVM-cached tables, GB (default 0: HBM only)"
    )
    p.add_argument(
        "--ssd-gb", type=float, default=0, help="SSD per GPU for key-value (SSD-backed) tables, GB (default 0: none)"
    )
    p.add_argument("--local-world-size", type=int, default=8, help="GPUs per host (default 8)")
    p.add_argument("--embedding-dim", type=int, default=128, help="embedding dim (default 128)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(run=run)


def spec_from_args(args: argparse.Namespace):
    from exfm_ray.errors import ConfigError
    from exfm_ray.fm.plan import PlanSpec
    from exfm_ray.fm.plan_tables import load_tables

    if (args.fm_params is None) == (args.tables is None):
        raise ConfigError("give exactly one of --fm-params and --tables")
    data: dict[str, Any] = {
        "gpus": args.gpus,
        "hbm_gb": args.hbm_gb,
        "ddr_gb": args.ddr_gb,
        "ssd_gb": args.ssd_gb,
        "local_world_size": args.local_world_size,
        "embedding_dim": args.embedding_dim,
    }
    if args.tables is not None:
        data["tables"] = load_tables(args.tables)
    else:
        data["fm_params"] = args.fm_params
    return PlanSpec.parse(data, source="plan")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    _quiet_planner()
    from exfm_ray.fm.plan import plan_fm
    from exfm_ray.fm.plan_report import format_report

    report = plan_fm(spec_from_args(args))
    if args.json:
        print(json.dumps(report.to_dict()), file=out)
    else:
        print(format_report(report), file=out)
    return 0


def _quiet_planner() -> None:
    # The planner logs warnings about its own search (e.g. kernels a constraint excludes): not for a user.
    logging.getLogger("torchrec").setLevel(logging.ERROR)
