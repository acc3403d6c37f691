"""PoLAR vs LoRA learning rates: dev accuracy, NLL and stable rank of polar-mle and lora-mle settings.

Every setting is a ``bayes-polar fit`` configuration (SmolLM2-135M, ``options``, adapters on the top
two blocks) trained on the first ``--train`` ARC-Easy training questions and scored on a dev split
carved from the *end* of the training split (the last ``--dev`` questions, disjoint from the
training ones; never the validation split). Settings are ``method:key=value,key=value``.

    python benchmarks/polar_lr.py --data-dir ../shared/data --cache-dir ~/.cache/bayes_polar/prefix \\
        lora-mle:lr=1e-3 polar-mle:stiefel_lr=1e-3 polar-mle:stiefel_lr=1e-2 polar-mle:stiefel_lr=3e-2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_setting(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    values = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        values[key] = float(value)
    return method, values


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", help="method:key=value,... (FitConfig fields, floats)")
    parser.add_argument("--data-dir", default=os.environ.get("BAYES_POLAR_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--cache-dir", default=None, help="prefix caches shared by the settings")
    parser.add_argument("--train", type=int, default=400, help="first N training questions")
    parser.add_argument("--dev", type=int, default=200, help="last N training questions (dev)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    args = parser.parse_args(argv)

    from bayes_polar.adapters import adapter_diagnostics
    from bayes_polar.config import FitConfig
    from bayes_polar.data.formats import encode_task
    from bayes_polar.data.tasks import load_task
    from bayes_polar.evaluation.metrics import classification_metrics
    from bayes_polar.run import build_pipeline, predict, train_pipeline

    full = load_task("arc_easy", "train", args.data_dir)
    if args.train + args.dev > len(full):
        raise SystemExit(f"--train + --dev exceeds the {len(full)} training questions")
    dev_task = replace(full, examples=full.examples[-args.dev:], split="train-dev")
    results, started = [], time.time()
    for text in args.settings:
        method, values = parse_setting(text)
        config = FitConfig(model="smollm2-135m", task="arc_easy", data_dir=args.data_dir, format="options",
                           layers="-2,-1", train_limit=args.train, steps=args.steps, batch_size=8, threads=1,
                           warmup_steps=10, checkpoint_every=0, seed=args.seed, method=method,
                           cache_dir=args.cache_dir, **values)
        t0 = time.time()
        pipe = build_pipeline(config)
        with tempfile.TemporaryDirectory() as run_dir:
            info = train_pipeline(pipe, Path(run_dir), resume=False, progress=False, log=lambda *_: None)
        dev = encode_task(dev_task, pipe.tokenizer, config.format, config.max_length)
        predictions = predict(pipe, dev, config.predictive_samples, seed=config.seed)
        metrics = classification_metrics(predictions["predictive"], predictions["labels"])
        ranks = [layer["stable_rank"] for layer in adapter_diagnostics(pipe.model).values()]
        row = {"setting": text, "method": method, **values,
               "stiefel_lr, theta_lr": config.adapter_learning_rates if method.startswith("polar") else None,
               "dev_acc": round(metrics["acc"], 4), "dev_nll": round(metrics["nll"], 4),
               "dev_ece": round(metrics["ece"], 2), "stable_rank_median": round(statistics.median(ranks), 3),
               "final_train_nll": round(statistics.mean(info["trace"][-10:]), 4),
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    out = {"benchmark": "polar_lr", "command": " ".join(["python benchmarks/polar_lr.py", *(argv or sys.argv[1:])]),
           "train_questions": args.train, "dev": f"last {args.dev} of arc_easy train",
           "steps": args.steps, "batch_size": 8, "layers": "-2,-1", "threads": 1, "seed": args.seed,
           "torch": torch.__version__, "seconds": round(time.time() - started, 1), "results": results}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
