"""`exfm run`: the whole ExFM loop (FM -> DAS -> students -> Serve) over a stream, then a report."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from exfm_ray.data.presets import STREAMS, source_fields
from jobs.settings import Settings

LOCAL_CPUS = 8  # logical CPUs of a local Ray: FM ranks, trainers, DAS and Serve time-share the cores


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole ExFM loop over a stream on Ray, ending with a report and served students")
    p.add_argument("--dataset", choices=STREAMS, default="synthetic", help="a named stream (docs/data.md)")
    p.add_argument("--data", type=Path, help="your own CSV/Parquet click log (with --mapping)")
    p.add_argument("--mapping", type=Path, help="YAML mapping of your file's columns")
    p.add_argument("--data-dir", type=Path, help="folder with movielens_100k/ and frappe/")
    p.add_argument("--windows", type=int, help="number of windows (synthetic, frappe)")
    p.add_argument("--rows-per-window", type=int, help="examples per window (synthetic)")
    p.add_argument("--tenants", type=int, help="synthetic tenants (default 2)")
    p.add_argument("--config", type=Path, help="PipelineConfig YAML (fm, tenants, serve, ...); flags override it")
    p.add_argument("--storage", type=Path, help="storage root (default EXFM_STORAGE or runs/store)")
    p.add_argument("--address", help="Ray cluster address (default: EXFM_RAY_ADDRESS, else a local Ray)")
    p.add_argument("--exit", action="store_true", help="stop serving at the end instead of serving until Ctrl-C")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace, settings: Settings):
    from exfm_ray.configbase import read_yaml
    from exfm_ray.pipeline.config import PipelineConfig

    data = read_yaml(args.config) if args.config else {}
    data["storage"] = str((args.storage or Path(data.get("storage") or settings.storage)).resolve())
    # Demo-sized by default (2 tenants, 6 windows of 10,000 examples); the YAML, then flags, override.
    data["source"] = source_fields(
        args.dataset,
        base=data.get("source"),
        synthetic_defaults={"num_tenants": 2, "num_windows": 6, "rows_per_window": 10_000},
        num_windows=args.windows,
        rows_per_window=args.rows_per_window,
        num_tenants=args.tenants,
        data_dir=args.data_dir or settings.resolved_data_dir(),
        data_path=args.data,
        mapping_path=args.mapping,
    )
    return PipelineConfig.parse(data, source=str(args.config or "exfm run"))


def run(args: argparse.Namespace) -> int:
    import ray

    from actors.pipeline import run_pipeline
    from exfm_ray.serving.deploy import undeploy
    from exfm_ray.students.store import StudentStore
    from jobs.cluster import connect
    from jobs.common import curl_example, quiet_ray_data

    settings = Settings()
    cfg = config_from_args(args, settings)
    # `ray job submit` puts the driver in the cluster through RAY_ADDRESS.
    address = args.address or settings.ray_address
    serve = cfg.serve_config()
    own = connect(address, num_cpus=LOCAL_CPUS, fast_ingress=settings.serve_fast_ingress, serve_port=serve.port)
    # After ray.init, which installs its own SIGTERM handler (a stack dump and abort).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        quiet_ray_data()
        report = run_pipeline(cfg)
        paths = report["paths"]
        print(Path(paths["markdown"]).read_text())
        print(f"report: {paths['markdown']} (plots: {paths['ne_plot']}, {paths['system_plot']})")
        url = report["serving"].get("url")
        store = StudentStore(cfg.storage)
        if url and store.tenants():
            print(f"query a student:\n  {curl_example(url, store, store.tenants()[0])}")
        if own and not args.exit and url:
            print("serving until Ctrl-C")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        if own:  # a local Ray ends with us; on a cluster the students stay served
            undeploy(cfg.serve_config(), all_of_serve=True)
        ray.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
