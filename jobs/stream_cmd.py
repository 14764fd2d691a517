"""`exfm stream`: write a dataset's stream as Parquet windows (what the DAS and trainers read)."""

from __future__ import annotations

import argparse
from pathlib import Path

from exfm_ray.data.presets import STREAMS, source_fields
from exfm_ray.data.sources import SourceConfig, load_stream
from jobs.settings import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("stream", help="write a stream (synthetic, a shared dataset or your file) as Parquet windows")
    p.add_argument("--dataset", choices=STREAMS, default="synthetic", help="a named stream (docs/data.md)")
    p.add_argument("--data", type=Path, help="your own CSV/Parquet file (with --mapping)")
    p.add_argument("--mapping", type=Path, help="YAML mapping of your file's columns")
    p.add_argument("--data-dir", type=Path, help="folder with movielens_100k/ and frappe/")
    p.add_argument("--windows", type=int, help="number of windows (synthetic, frappe)")
    p.add_argument("--rows-per-window", type=int, help="examples per window (synthetic)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(run=run)


def source_from_args(args: argparse.Namespace) -> SourceConfig:
    fields = source_fields(
        args.dataset,
        num_windows=args.windows,
        rows_per_window=args.rows_per_window,
        data_dir=args.data_dir or Settings().resolved_data_dir(),
        data_path=args.data,
        mapping_path=args.mapping,
    )
    return SourceConfig.parse(fields, source="exfm stream")


def run(args: argparse.Namespace) -> int:
    stream = load_stream(source_from_args(args))
    stream.write(args.out)
    print(f"{stream.spec.name}: {stream.report.summary()}")
    print(f"{stream.spec.num_windows} windows, tenants {stream.spec.tenant_names} -> {args.out}")
    return 0
