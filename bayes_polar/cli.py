"""The ``bayes-polar`` command: ``bayes-polar SUBCOMMAND --help`` for each."""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import warnings
from pathlib import Path

from . import __version__

DEMO = dict(model="smollm2-135m", task="arc_easy", format="options", method="polar-vbll", train_limit=None,
            steps=300, batch_size=8, layers="-2,-1", max_length=128, threads=2, checkpoint_every=50)


def _cmd_tasks(args) -> int:
    """Every built-in task with the row count of each split in the local mirror; other splits say 'hub'."""
    from .data.tasks import TASKS, default_data_dir, load_task

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    for name, spec in TASKS.items():
        counts = []
        for split, file in spec.files.items():
            if data_dir is None or not (data_dir / spec.folder / file).is_file():
                counts.append(f"{split} (hub)")
                continue
            try:
                counts.append(f"{split} {len(load_task(name, split, data_dir))}")
            except Exception as exc:  # report, keep listing
                counts.append(f"{split} unavailable ({type(exc).__name__})")
        print(f"{name:24s} {spec.hub_id:22s} classes<={spec.num_classes}  " + ", ".join(counts))
    print("and your own files: --task PATH.jsonl|.csv|FOLDER (see README, 'Your own data')")
    return 0


def _config(args, base: dict | None = None):
    from .config import FitConfig, config_from_args

    values = dict(base or {})
    if args.config:
        values.update(FitConfig.load(args.config).to_dict())
    return config_from_args(args, values)


def _fit(config, args) -> None:
    """``run_fit``, in one process or as one of torchrun's (rank 0 alone reports)."""
    from .training.distributed import session
    from .run import run_fit

    with session() as ctx:
        run_fit(config, args.out, overwrite=args.overwrite, resume=args.resume, extend=args.extend,
                progress=not args.quiet and ctx.is_main, log=print if ctx.is_main else lambda *_: None)


def _cmd_fit(args) -> int:
    _fit(_config(args), args)
    return 0


def _cmd_demo(args) -> int:
    config = _config(args, DEMO)
    if int(os.environ.get("RANK", "0")) == 0:
        print("bayes-polar demo: " + json.dumps({k: getattr(config, k) for k in DEMO}))
    _fit(config, args)
    return 0


def _cmd_evaluate(args) -> int:
    from .run import evaluate_run

    evaluate_run(args.run_dir, args.task, args.split, args.data_dir, args.limit, device=args.device,
                 dtype=args.dtype, **_trust(args))
    return 0


def _cmd_predict(args) -> int:
    from .predict import Predictor, score, write_jsonl

    predictor = Predictor.from_run(args.run_dir, num_samples=args.num_samples, device=args.device, dtype=args.dtype)
    results = predictor.predict_file(args.input)
    if args.output:
        write_jsonl(results, args.output)
    else:
        for result in results:
            print(json.dumps(result))
    metrics = score(results)
    summary = f"{len(results)} questions"
    if metrics is not None:
        summary += (f"; {metrics['n']} with answers: ACC {metrics['acc']:.3f}, ECE {metrics['ece']:.2f}%, "
                    f"NLL {metrics['nll']:.3f}, Brier {metrics['brier']:.3f}")
    print(summary + (f"; predictions in {args.output}" if args.output else ""),
          file=sys.stdout if args.output else sys.stderr)  # stdout stays JSON lines without --output
    return 0


def _cmd_export(args) -> int:
    from .export import export_run

    export_run(args.run_dir, args.out, overwrite=args.overwrite)
    return 0


def _add_trust_arguments(parser) -> None:
    """What a command loading RUN_DIR lets run or write: never decided by the run directory itself."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the Python code of the run's model (only for a model you trust)")
    parser.add_argument("--allow-code-from-run", action="store_true",
                        help="import the prior / guide .py file the run's config.json names")
    parser.add_argument("--prior", default=None, help="the run's prior .py file, re-passed: it runs (as with fit)")
    parser.add_argument("--guide", default=None, help="the run's guide .py file, re-passed: it runs (as with fit)")
    parser.add_argument("--cache-dir", default=None, help="folder for the prefix cache (default: memory only; "
                        "the run's own cache_dir is ignored)")


def _trust(args) -> dict:
    return dict(trust_remote_code=args.trust_remote_code, allow_code_from_run=args.allow_code_from_run,
                prior=args.prior, guide=args.guide, cache_dir=args.cache_dir)


def _cmd_table(args) -> int:
    from .evaluation.table import Grid, run_grid

    run_grid(Grid.load(args.config), args.out, progress=not args.quiet and args.jobs == 1, jobs=args.jobs,
             select_only=args.select_only, report_only=args.report_only)
    print((Path(args.out) / ("selection.csv" if args.select_only else "table.md")).read_text())
    return 0


def _cmd_posterior_check(args) -> int:
    from .evaluation.posterior_check import posterior_check
    from .run import load_run

    pipe = load_run(args.run_dir, args.data_dir, device=args.device, dtype=args.dtype, **_trust(args))
    posterior_check(pipe, run_dir=args.run_dir, task=args.task, split=args.split, limit=args.limit, eval_split=args.eval_split,
                    eval_limit=args.eval_limit, dims=args.dims, num_samples=args.num_samples, warmup=args.warmup,
                    chains=args.chains, vi_steps=args.vi_steps, elbo=args.elbo, data_dir=args.data_dir, seed=args.seed,
                    progress=not args.quiet)
    return 0


def _add_fit_arguments(parser) -> None:
    from .config import add_config_arguments

    parser.add_argument("--out", required=True, help="RUN_DIR for config, metrics, figures, weights, checkpoints")
    parser.add_argument("--config", default=None, help="JSON file of options (command-line options win)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR's latest checkpoint")
    parser.add_argument("--extend", action="store_true", help="with --resume: accept another --steps than the "
                        "run's (the learning-rate schedule is stretched: the result matches no uninterrupted run)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(parser)


def _add_placement_arguments(parser) -> None:
    """``--device`` / ``--dtype`` of a command that loads a finished run (default: the run's own)."""
    parser.add_argument("--device", default=None, help="backbone device: auto, cpu, cuda or cuda:N (default: the run's)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="backbone precision (default: the run's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-polar",
        description="Calibrated Bayesian fine-tuning of language models (PoLAR adapters + variational Bayesian last layer).",
    )
    parser.add_argument("--version", action="version", version=f"bayes-polar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fit = sub.add_parser("fit", help="fine-tune a method on a task and evaluate it")  # helps state their defaults
    _add_fit_arguments(fit)
    fit.set_defaults(func=_cmd_fit)

    demo = sub.add_parser("demo", help="the README's main job: PoLAR-VBLL on SmolLM2-135M and ARC-Easy (~10 min)")
    _add_fit_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    evaluate = sub.add_parser("evaluate", help="evaluate a finished run on another task/split")
    evaluate.add_argument("run_dir", help="a RUN_DIR written by bayes-polar fit")
    evaluate.add_argument("--task", required=True, help="task name (bayes-polar tasks)")
    evaluate.add_argument("--split", default=None, help="split (default: validation, or test for MMLU)")
    evaluate.add_argument("--data-dir", default=None, help="local data mirror (default: the run's or $BAYES_POLAR_DATA)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    _add_placement_arguments(evaluate)
    _add_trust_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_evaluate)

    predict = sub.add_parser("predict", help="predict questions of a JSONL/CSV file with a finished run: "
                             "probabilities, prediction, confidence, entropy = aleatoric + epistemic")
    predict.add_argument("run_dir", help="a RUN_DIR written by bayes-polar fit (its training data is not needed)")
    predict.add_argument("--input", required=True, help="questions in the generic schema (question, choices, "
                         "optional answer, context, id); .jsonl or .csv")
    predict.add_argument("--output", default=None, help="write one JSON line per question here (default: stdout)")
    predict.add_argument("--num-samples", type=int, default=None, help="last-layer draws (default: the run's "
                         "predictive_samples)")
    _add_placement_arguments(predict)
    predict.set_defaults(func=_cmd_predict)

    export = sub.add_parser("export", help="write a merged Hugging Face model, the last layer (and a peft "
                            "adapter for LoRA methods) and a model card")
    export.add_argument("run_dir", help="a RUN_DIR written by bayes-polar fit")
    export.add_argument("--out", required=True, help="output folder (model/, head/, peft/, README.md)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    export.set_defaults(func=_cmd_export)

    table = sub.add_parser("table", help="run a grid of methods x tasks x seeds and write the results table")
    table.add_argument("--config", required=True, help="grid JSON (see benchmarks/configs/)")
    table.add_argument("--out", required=True, help="output folder (finished cells are not re-run)")
    table.add_argument("--jobs", type=int, default=1, help="cells run in this many processes at once (each "
                       "uses the grid's `threads`; caches are filled first, one task per process)")
    table.add_argument("--quiet", action="store_true", help="no progress bars")
    table.add_argument("--select-only", action="store_true", help="only choose each method's setting (the grid's "
                       "`search`, on a dev split cut from the training split), then stop")
    table.add_argument("--report-only", action="store_true", help="run no cell: write the table of the cells "
                       "finished so far (a grid still running, or one run over several sessions)")
    table.set_defaults(func=_cmd_table)

    check = sub.add_parser("posterior-check", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           help="compare the run's VI posterior with NUTS on fixed (projected) training features")
    check.add_argument("run_dir", help="a RUN_DIR of a variational method (polar-vbll, lora-vbll, ...)")
    check.add_argument("--task", default=None, help="task of the questions (default: the run's training task)")
    check.add_argument("--split", default="train", help="split NUTS and VI condition on")
    check.add_argument("--limit", type=int, default=256, help="use the first N questions of that split")
    check.add_argument("--eval-split", default=None, help="split of the predictive comparison (default: validation)")
    check.add_argument("--eval-limit", type=int, default=256, help="first N questions of the evaluation split")
    check.add_argument("--dims", type=int, default=32, help="project the features to this many dimensions")
    check.add_argument("--num-samples", type=int, default=500, help="NUTS draws per chain")
    check.add_argument("--warmup", type=int, default=500, help="NUTS warm-up steps per chain")
    check.add_argument("--chains", type=int, default=2, help="NUTS chains (run one after the other)")
    check.add_argument("--vi-steps", type=int, default=2000, help="SVI steps of the matching VI guide")
    check.add_argument("--elbo", default="mc", choices=("mc", "jensen"), help="ELBO of the matching VI guide")
    check.add_argument("--seed", type=int, default=0, help="random seed")
    check.add_argument("--data-dir", default=None, help="local data mirror (default: the run's or $BAYES_POLAR_DATA)")
    check.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_placement_arguments(check)
    _add_trust_arguments(check)
    check.set_defaults(func=_cmd_posterior_check)

    tasks = sub.add_parser("tasks", help="list the benchmark tasks and their row counts")
    tasks.add_argument("--data-dir", default=None, help="local data mirror (default: $BAYES_POLAR_DATA)")
    tasks.set_defaults(func=_cmd_tasks)
    return parser


# Faults of the machine, not of bayes-polar: disk full, quota or file-size limit, read-only or failing disk,
# no permission, too many open files.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM,
                                errno.EMFILE, errno.ENFILE, errno.EFBIG})


def environment_fault(exc: OSError) -> str:
    """One line for an OSError of the machine; every write is atomic, so what was there before is intact."""
    where = f" ({exc.filename})" if exc.filename else ""
    return (f"{exc.strerror or exc}{where}: files written before are intact (writes are atomic); fix it and run "
            "the command again (a fit continues from its latest checkpoint with --resume)")


def one_line(text: str) -> str:
    """``text`` on one line (library messages may quote multi-line errors of other libraries)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings as one ``bayes-polar: warning: ...`` line; others as Python prints them."""
    from .errors import BayesPolarWarning

    if issubclass(category, BayesPolarWarning):
        print(f"bayes-polar: warning: {one_line(message)}", file=file or sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--layers -2,-1`` -> ``--layers=-2,-1``: argparse reads a value starting with '-' as an option."""
    out = []
    for arg in argv:
        if out and out[-1] == "--layers" and re.fullmatch(r"-\d+(,\s*-?\d+)*", arg):
            out[-1] = f"--layers={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Errors of bayes-polar (bad input, numerical faults, unusable checkpoints)
    print one ``bayes-polar: error: ...`` line and return 1; anything else is a bug and keeps its traceback."""
    from .errors import BayesPolarError

    parser = build_parser()
    args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command not in ("fit", "demo") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"bayes-polar: error: only fit and demo run under torchrun, not {args.command}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except BayesPolarError as exc:
        print(f"bayes-polar: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"bayes-polar: error: {environment_fault(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bayes-polar: interrupted (a fit continues from its latest checkpoint with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
