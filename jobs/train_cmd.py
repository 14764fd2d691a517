"""`exfm train --windows A:B`: train every registered tenant's student concurrently on Ray Train.

Each tenant gets its own TorchTrainer run (launched by the tenant manager, at most
--max-concurrent at a time); progress shows one bar per tenant. At the end it writes every
tenant's per-window metrics (tenants.json), a table (tenants.md) and NE per window (PNG).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exfm_ray.errors import ConfigError
from jobs.settings import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train all registered tenants' students concurrently (Ray Train)")
    p.add_argument("--windows", required=True, help="A:B (inclusive), or A: with --follow to follow the stream")
    p.add_argument("--follow", action="store_true", help="wait for windows the DAS has not committed yet")
    p.add_argument("--max-concurrent", type=int, default=4, help="tenant runs holding resources at a time")
    p.add_argument(
        "--tenants-per-run",
        type=int,
        help="one-worker tenants one Ray Train run hosts at most (1: each tenant its own run; default 32)",
    )
    p.add_argument(
        "--young-fm-wait",
        type=float,
        help="seconds (at most 900) a tenant judging the young FM waits for the tenants other runs are bringing to "
        "the FM's first labeled window (docs/design.md; default 120)",
    )
    p.add_argument("--storage", type=Path, help="storage root (default EXFM_STORAGE or runs/store)")
    p.add_argument("--address", help="Ray cluster address (default: EXFM_RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--out", type=Path, help="folder for tenants.json/.md and ne_per_window.png (default <storage>/reports/train)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def parse_window_range(text: str, follow: bool) -> tuple[int, int | None]:
    from jobs.common import parse_windows

    if text.endswith(":") and follow:
        return parse_windows(text[:-1])[0], None
    windows = parse_windows(text)
    return windows[0], windows[-1]


def run(args: argparse.Namespace) -> int:
    from actors.tenant_manager import TenantManagerConfig
    from exfm_ray.tenants.checks import check_ready
    from exfm_ray.tenants.report import write_storage_report
    from exfm_ray.tenants.trainer import YOUNG_FM_WAIT_MAX_S
    from jobs.cluster import connect

    storage = (args.storage or Settings().storage).resolve()
    first, last = parse_window_range(args.windows, args.follow)
    for flag, value in (("--max-concurrent", args.max_concurrent), ("--tenants-per-run", args.tenants_per_run)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1")
    if args.young_fm_wait is not None and not 0 <= args.young_fm_wait <= YOUNG_FM_WAIT_MAX_S:
        raise ConfigError(f"--young-fm-wait must be within 0..{YOUNG_FM_WAIT_MAX_S:g} seconds")
    tenants = check_ready(storage, first, last, args.follow)
    connect(args.address or Settings().ray_address)
    given = {"tenants_per_run": args.tenants_per_run, "young_fm_wait_s": args.young_fm_wait}
    shared = {k: v for k, v in given.items() if v is not None}
    cfg = TenantManagerConfig(storage=str(storage), max_concurrent=args.max_concurrent, **shared)
    status = train_tenants(cfg, first, last, args.follow, show_progress=not args.no_progress)
    out = args.out or storage / "reports" / "train"
    paths = write_storage_report(storage, out, list(status["runs"]) or tenants)
    print(paths["markdown"].read_text())
    print(f"metrics: {paths['json']}\nplot: {paths['plot']}")
    failed = {n: r.get("error") for n, r in status["runs"].items() if r["status"] == "failed"}
    for name, error in failed.items():
        print(f"tenant {name} failed: {error}")
    return 1 if failed else 0


def train_tenants(cfg, first: int, last: int | None, follow: bool, show_progress: bool = True) -> dict:
    """Start the tenant manager, train, show one bar per tenant; returns the manager's final status."""
    import ray

    from actors.launch import start_tenant_manager
    from exfm_ray.tenants.status import TenantBars

    manager = start_tenant_manager(cfg)
    try:
        ref = manager.train.remote(first, last, follow)
        bars = TenantBars(cfg.storage, first, last, enabled=show_progress)
        while not ray.wait([ref], timeout=0.5)[0]:
            bars.update(ray.get(manager.status.remote()))
        status = ray.get(ref)
        bars.update(status)
        bars.close()
        return status
    finally:
        ray.kill(manager)
