"""`exfm experiment`: the streaming ExFM experiment in one process."""

from __future__ import annotations

import argparse
from pathlib import Path

from exfm_ray.data.presets import STREAMS
from exfm_ray.experiment.config import SWEEPS, ExperimentConfig
from exfm_ray.experiment.recipes import experiment_recipe
from exfm_ray.students.config import DEFAULT_VARIANT, VARIANTS, split_variants
from jobs.settings import Settings


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="run the streaming ExFM experiment and write a results table")
    p.add_argument("--dataset", choices=STREAMS, default="synthetic", help="a named stream (docs/data.md)")
    p.add_argument("--data", type=Path, help="your own CSV/Parquet file (with --mapping)")
    p.add_argument("--mapping", type=Path, help="YAML mapping of your file's columns")
    p.add_argument("--data-dir", type=Path, help="folder with movielens_100k/ and frappe/ (default EXFM_DATA_DIR)")
    p.add_argument("--config", type=Path, help="full ExperimentConfig YAML (overrides the recipe)")
    p.add_argument("--quick", action="store_true", help="small form: fewer windows and 3 seeds")
    p.add_argument("--seeds", type=int, help="number of seeds")
    p.add_argument("--fm-delay", type=int, help="FM delay in windows (0 = leaky oracle, diagnostic only)")
    p.add_argument(
        "--variants",
        help=f"comma-separated, from {','.join(VARIANTS)}; knobs per arm as ah_sa@w=2,beta=0.5 "
        f"(default: all; the FM is always reported; {DEFAULT_VARIANT} is the default variant)",
    )
    p.add_argument("--sweep", choices=SWEEPS, help="run one of the method's evidence sweeps (docs/results.md)")
    p.add_argument("--out", type=Path, default=Path("runs/experiment"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    if args.config:
        cfg = ExperimentConfig.from_yaml(args.config)
    else:
        dataset = "byo" if args.data or args.mapping else args.dataset
        cfg = experiment_recipe(
            dataset,
            quick=args.quick,
            data_dir=args.data_dir or Settings().resolved_data_dir(),
            data_path=args.data,
            mapping_path=args.mapping,
        )
    changes = {}
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.fm_delay is not None:
        changes["fm_delay"] = args.fm_delay
    if args.variants:
        changes["variants"] = split_variants(args.variants)
    return cfg.replace(**changes) if changes else cfg


def run(args: argparse.Namespace) -> int:
    from exfm_ray.experiment.api import experiment

    cfg = config_from_args(args)
    if args.sweep:
        from exfm_ray.experiment.api import sweep

        result = sweep(cfg, args.sweep, args.out, show_progress=not args.no_progress)
        print(Path(result["paths"]["markdown"]).read_text())
        for kind, path in result["paths"].items():
            print(f"{kind}: {path}")
        return 0
    results = experiment(cfg, args.out, show_progress=not args.no_progress)
    print(Path(results["paths"]["markdown"]).read_text())
    print(f"{results['load_report']}; {results['seconds']} s")
    if results["leaky"]:
        print("warning: --fm-delay 0 is a leaky oracle (FM trained on the window it labels); not a result")
    for kind, path in results["paths"].items():
        print(f"{kind}: {path}")
    return 0
