"""`exfm`: the command line. Parses, builds config, calls one library function per command.

User mistakes (ExfmError) print one line and exit 2, without a stack trace.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from exfm_ray.errors import ExfmError
from jobs import (
    augment_cmd,
    bench_cmd,
    experiment_cmd,
    fm_cmd,
    plan_cmd,
    run_cmd,
    serve_cmd,
    stream_cmd,
    tenants_cmd,
    train_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exfm", description="ExFM: distill a large foundation model into students.")
    sub = parser.add_subparsers(dest="command", required=True)
    experiment_cmd.add_parser(sub)
    plan_cmd.add_parser(sub)
    stream_cmd.add_parser(sub)
    fm_cmd.add_parser(sub)
    augment_cmd.add_parser(sub)
    tenants_cmd.add_parser(sub)
    train_cmd.add_parser(sub)
    run_cmd.add_parser(sub)
    serve_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    parser.set_defaults(exfm=main)  # a command that runs other commands (exfm bench tenants) calls this
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ExfmError as exc:
        print(f"exfm {args.command}: error: {_unwrap(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"exfm {args.command}: interrupted", file=sys.stderr)
        return 130


def _unwrap(exc: BaseException) -> str:
    """A user error raised inside a Ray actor arrives wrapped; show the user's message only."""
    cause = getattr(exc, "cause", None)
    return str(cause) if isinstance(cause, ExfmError) else str(exc)


def _quiet_third_party() -> None:
    # torchrec/fbgemm import-time deprecation chatter says nothing to a user of exfm.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torchrec|fbgemm_gpu|torch)\b.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
