"""`exfm augment --windows A:B`: run the DAS over stream windows through the running FM group."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.common import parse_windows, quiet_ray_data
from jobs.settings import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("augment", help="label stream windows with the FM group and write augmented Parquet")
    p.add_argument("--windows", required=True, help="A:B (inclusive) or one window")
    p.add_argument("--stream", type=Path, required=True, help="stream folder written by `exfm stream`")
    p.add_argument("--storage", type=Path, help="storage root (default EXFM_STORAGE or runs/store)")
    p.add_argument("--address", help="Ray cluster address (default: EXFM_RAY_ADDRESS, else a local Ray)")
    p.add_argument("--group", default="exfm-fm", help="actor name of the FM group")
    p.add_argument("--batch-size", type=int, default=4096, help="examples per FM call")
    p.add_argument("--workers", type=int, default=1, help="DAS workers (spread over the cluster's nodes)")
    p.add_argument("--unit-rows", type=int, default=65_536, help="rows one worker reads, labels and writes at a time")
    p.add_argument("--labels", type=Path, help="folder of delayed label events (example_id, task, label_time)")
    p.add_argument("--attribution-s", type=int, default=86_400, help="attribution window of delayed labels")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from exfm_ray.das.pipeline import AugmentConfig, augment_windows
    from exfm_ray.das.window_log import summary_line
    from jobs.cluster import connect

    windows = parse_windows(args.windows)
    cfg = AugmentConfig.parse(
        {
            "storage": str((args.storage or Settings().storage).resolve()),
            "stream": str(args.stream.resolve()),
            "group_name": args.group,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "unit_rows": args.unit_rows,
            "labels": {"path": str(args.labels.resolve()), "attribution_s": args.attribution_s}
            if args.labels
            else None,
        },
        source="exfm augment",
    )
    connect(args.address or Settings().ray_address)
    quiet_ray_data()
    with tqdm(total=len(windows), desc="augment", unit="window") as bar:

        def progress(result: dict) -> None:
            bar.write(summary_line(result))
            bar.update(1)

        results = augment_windows(cfg, windows, progress)
    waiting = [r["window"] for r in results if r["status"] == "waiting_for_labels"]
    if waiting:
        print(f"FM labels staged; waiting for delayed labels to close windows {waiting}: re-run later")
    return 0
