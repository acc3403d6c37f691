"""The ``bayes-polar`` command: ``bayes-polar SUBCOMMAND --help`` for each."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def _cmd_tasks(args) -> int:
    from .tasks import TASKS, load_task

    for name, spec in TASKS.items():
        counts = []
        for split in spec.files:
            try:
                counts.append(f"{split} {len(load_task(name, split, args.data_dir))}")
            except Exception as exc:  # report, keep listing
                counts.append(f"{split} unavailable ({type(exc).__name__})")
        print(f"{name:24s} {spec.hub_id:22s} classes<={spec.num_classes}  " + ", ".join(counts))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-polar",
        description="Calibrated Bayesian fine-tuning of language models (PoLAR adapters + variational Bayesian last layer).",
    )
    parser.add_argument("--version", action="version", version=f"bayes-polar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tasks = sub.add_parser("tasks", help="list the benchmark tasks and their row counts")
    tasks.add_argument("--data-dir", default=None, help="local data mirror (default: $BAYES_POLAR_DATA)")
    tasks.set_defaults(func=_cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
