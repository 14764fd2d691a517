"""`exfm fm ...`: train and publish FM versions; start, inspect, switch and stop the FM group."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.settings import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("fm", help="the foundation model: train, start/status/switch/stop its actor group")
    fm = p.add_subparsers(dest="fm_command", required=True)

    def common(q, *, address: bool = True) -> None:
        q.add_argument("--storage", type=Path, help="storage root (default EXFM_STORAGE or runs/store)")
        if address:
            q.add_argument("--address", help="Ray cluster address (default: EXFM_RAY_ADDRESS, else a local Ray)")
        q.add_argument("--name", default="exfm-fm", help="actor name of the FM group")

    t = fm.add_parser("train", help="train the FM on the stream up to a window with Ray Train and publish it")
    common(t)
    t.add_argument("--stream", type=Path, required=True, help="stream folder written by `exfm stream`")
    t.add_argument("--through-window", type=int, help="last window to train on (required unless --follow)")
    t.add_argument("--follow", action="store_true", help="train each window as the stream writes it, a version each")
    t.add_argument("--workers", type=int, default=2, help="Ray Train workers (FM ranks)")
    t.add_argument("--size", type=int, help="FM size dial")
    t.add_argument("--sharding", help="force a sharding type (table_wise, column_wise, ...)")
    t.add_argument("--retrain", action="store_true", help="train from scratch instead of from the current version")
    t.set_defaults(run=run_train)

    s = fm.add_parser("start", help="start the long-lived FM group (detached, named)")
    common(s)
    s.add_argument("--shards", type=int, default=2, help="ranks per gang")
    s.add_argument("--replicas", type=int, default=1, help="gangs")
    s.add_argument("--sharding", help="force a sharding type (table_wise, column_wise, ...)")
    s.add_argument("--version", help="FM version (default: the registry's current)")
    s.set_defaults(run=run_start)

    for name, fn, text in (("status", run_status, "show the group"), ("stop", run_stop, "stop the group")):
        q = fm.add_parser(name, help=text)
        common(q)
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.set_defaults(run=fn)

    w = fm.add_parser("switch", help="switch the running group to another FM version")
    common(w)
    w.add_argument("--version", help="FM version (default: the registry's current)")
    w.set_defaults(run=run_switch)


def _storage(args) -> Path:
    return (args.storage or Settings().storage).resolve()


def _connect(args, *, persistent: bool = False) -> None:
    from jobs.cluster import connect

    connect(args.address or Settings().ray_address, persistent=persistent)


def _sharding(args) -> dict:
    return {"sharding_type": args.sharding} if args.sharding else {}


def run_train(args: argparse.Namespace) -> int:
    from exfm_ray.fm.config import FMConfig
    from exfm_ray.fm.train_job import FMTrainConfig, train_fm

    cfg = FMTrainConfig.parse(
        {
            "storage": str(_storage(args)),
            "stream": str(args.stream.resolve()),
            "through_window": args.through_window,
            "follow": args.follow,
            "num_workers": args.workers,
            "incremental": not args.retrain,
            "sharding": _sharding(args),
            **({"fm": FMConfig(size=args.size)} if args.size else {}),
        },
        source="exfm fm train",
    )
    _connect(args)
    version = train_fm(cfg)
    if version is None:
        print(f"the current FM version already covers window {args.through_window}; nothing to train")
    else:
        print(f"published {version.version}: windows through {version.through_window}, watermark {version.watermark}")
    return 0


def run_start(args: argparse.Namespace) -> int:
    from actors.fm_group import FMGroupConfig
    from actors.launch import start_fm_group

    cfg = FMGroupConfig.parse(
        {
            "name": args.name,
            "storage": str(_storage(args)),
            "num_shards": args.shards,
            "num_replicas": args.replicas,
            "sharding": _sharding(args),
        },
        source="exfm fm start",
    )
    _connect(args, persistent=True)
    import ray

    status = ray.get(start_fm_group(cfg, version=args.version).status.remote())
    print(f"FM group {cfg.name!r} ready: version {status.version_name}, {cfg.num_replicas} x {cfg.num_shards} ranks")
    return 0


def run_status(args: argparse.Namespace) -> int:
    import ray

    from actors.launch import get_fm_group

    _connect(args)
    status = ray.get(get_fm_group(args.name).status.remote())
    if args.json:
        print(status.model_dump_json(indent=1))
        return 0
    print(f"FM group {status.name}: version {status.version_name}, ready {status.ready}")
    print(f"calls {status.calls} (failed {status.failed_calls}), rows labeled {status.rows_labeled}")
    for g in status.gangs:
        types = sorted(set(g.plan.values()))
        print(f"  gang {g.gang}: {g.status}, {g.ranks} ranks, sharding {types}, rebuilds {g.rebuilds}")
    return 0


def run_switch(args: argparse.Namespace) -> int:
    import ray

    from actors.launch import get_fm_group

    _connect(args)
    status = ray.get(get_fm_group(args.name).switch.remote(args.version))
    print(f"FM group {status.name} now serves {status.version_name}")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from actors.launch import stop_fm_group

    _connect(args)
    stopped = stop_fm_group(args.name)
    print(f"FM group {args.name!r} stopped" if stopped else f"no FM group {args.name!r} was running")
    return 0
