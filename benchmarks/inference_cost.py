"""Inference cost per 100 questions: PoLAR-VBLL (1 pass + S = 256 head samples) vs BLoB (N = 10 sampled passes),
a deep ensemble (M = 3) and MC-dropout (N = 10), with a deterministic pass as the floor (issue 20 targets: BLoB /
PoLAR-VBLL >= 8, PoLAR-VBLL / deterministic <= 1.05).

Every side predicts the same ARC-Easy validation batches with full backbone passes (prefix cache off: a
deployed model sees new questions), all five interleaved in one process (the order reverses every repeat);
seconds per batch are scaled to 100 questions. Peak memory: each side once more in its own subprocess
(this script with ``--worker``) loads its backbone, builds the method, then resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``) and predicts the same batches: ``predict_peak_rss_mb`` is the peak
resident set size while predicting (``VmHWM``), ``predict_increment_mb`` its rise over the resident size just
before (CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``). The process-lifetime peak
(``ru_maxrss``) is reported too; loading the backbone usually sets it.

- ``deterministic``: ``head.point_proba(features(batch))`` of PoLAR-VBLL: one pass, softmax at the mean;
- ``polar_vbll_S256``: ``predict_proba(batch, 256)`` of polar-vbll: one pass, 256 logit draws;
- ``lora_blob_N10``: lora-blob with ``mc_passes=10``: ten passes, adapter weights sampled (flipout);
- ``lora_mcdropout_N10``: lora-mcdropout with ``mc_passes=10``: ten passes with dropout on;
- ``lora_ensemble_M3``: ``Ensemble.predict`` over three lora-mle members (weights loaded in turn, one pass each).

Methods are untrained (cost does not depend on the weights' values).

    python benchmarks/inference_cost.py
    python benchmarks/inference_cost.py --model smollm2-135m --batch-size 4 --batches 2 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys

import torch

import _common as bench

SAMPLES, PASSES, MEMBERS = 256, 10, 3
SIDES = ("deterministic", "polar_vbll_S256", "lora_blob_N10", "lora_mcdropout_N10", "lora_ensemble_M3")
BLOB_TARGET, ONE_PASS_TARGET = 8, 1.05


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(args, names) -> tuple[dict, object]:
    """``(predictors, a pipeline)``: a callable ``batch -> probabilities`` per side in ``names``.

    Each method gets its own backbone (adapters are injected in place).
    """
    from bayes_polar.training.methods import Ensemble

    def pipe(**overrides):
        return bench.pipeline(args, bench.load_model(args), train_limit=16, prefix_cache=False, **overrides)

    make, last = {}, None
    if "lora_blob_N10" in names:
        last = pipe(method="lora-blob", mc_passes=PASSES)
        blob = last.method
        make["lora_blob_N10"] = lambda b: blob.predict_proba(b, SAMPLES)
    if "lora_mcdropout_N10" in names:
        last = pipe(method="lora-mcdropout", mc_passes=PASSES)
        mcd = last.method
        make["lora_mcdropout_N10"] = lambda b: mcd.predict_proba(b, SAMPLES)
    if "lora_ensemble_M3" in names:
        last = pipe(method="lora-mle")
        members = []
        for m in range(MEMBERS):  # distinct members: the weights differ, the cost is the same
            torch.manual_seed(m)
            members.append({k: v + 1e-3 * torch.randn_like(v) for k, v in last.method.state_tensors().items()})
        ensemble = Ensemble(last.method, members)
        make["lora_ensemble_M3"] = lambda b: ensemble.predict(b, SAMPLES)[0]
    if {"deterministic", "polar_vbll_S256"} & set(names):  # last: its head owns Pyro's param store
        last = pipe(method="polar-vbll")
        polar = last.method
        make["deterministic"] = lambda b: polar.head.point_proba(polar.features(b))
        make["polar_vbll_S256"] = lambda b: polar.predict_proba(b, SAMPLES)
    return {name: make[name] for name in names}, last


def eval_batches(args, pipe) -> list:
    from bayes_polar.data.formats import make_loader
    from bayes_polar.run import encode_eval

    encoded = encode_eval(pipe, "arc_easy", "validation", limit=args.batches * args.batch_size)
    return list(make_loader(encoded, pipe.tokenizer, batch_size=args.batch_size))


def worker(args) -> None:
    """One side in this process: the peak resident memory while it predicts every batch once."""
    predictors, pipe = build(args, [args.worker])
    batches = eval_batches(args, pipe)
    _reset_peak_rss()
    before = _status_mb("VmRSS")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for batch in batches:
        predictors[args.worker](batch)
    peak = _status_mb("VmHWM")
    out = {"predict_peak_rss_mb": round(peak, 1), "predict_increment_mb": round(peak - before, 1),
           "process_peak_rss_mb": round(_rss_mb(), 1)}
    if args.device == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("RESULT " + json.dumps(out))


def memory_side(args, side: str) -> dict:
    return bench.run_worker(__file__, side, args, "--batches", str(args.batches), "--batch-size", str(args.batch_size))


def main(argv=None) -> None:
    parser = bench.base_parser(__doc__, repeats=3, batches=(2, "distinct validation batches"))
    parser.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bench.setup(args)
    if args.worker:
        return worker(args)
    load = bench.load_now()
    predictors, pipe = build(args, SIDES)
    batches = eval_batches(args, pipe)
    sides = {name: (lambda i, f=f: f(batches[i % len(batches)])) for name, f in predictors.items()}
    samples = bench.interleaved(args, sides, args.repeats)
    per_100 = 100 / args.batch_size
    seconds = {name: [s * per_100 for s in values] for name, values in samples.items()}
    memory = {side: memory_side(args, side) for side in SIDES}
    median = {name: statistics.median(s) for name, s in seconds.items()}
    ratios = [bench.paired_ratio("lora_blob_N10_over_polar_vbll_S256", seconds["lora_blob_N10"],
                                 seconds["polar_vbll_S256"], BLOB_TARGET, sense=">="),
              bench.paired_ratio("polar_vbll_S256_over_deterministic_eval", seconds["polar_vbll_S256"],
                                 seconds["deterministic"], ONE_PASS_TARGET)]
    for name in ("lora_mcdropout_N10", "lora_ensemble_M3", "lora_blob_N10"):
        other = "deterministic" if name == "lora_blob_N10" else "polar_vbll_S256"
        ratios.append(bench.paired_ratio(f"{name}_over_{other}", seconds[name], seconds[other]))
    ratios.append(bench.ratio("lora_blob_N10_over_polar_vbll_S256_predict_peak_rss",
                              memory["lora_blob_N10"]["predict_peak_rss_mb"],
                              memory["polar_vbll_S256"]["predict_peak_rss_mb"],
                              note="informational: peak RSS while predicting (backbone included)"))
    measurements = {"seconds_per_100_questions": {n: bench.timing(s) for n, s in seconds.items()},
                    "median_seconds_per_100_questions": {n: round(v, 3) for n, v in median.items()},
                    "memory": memory}
    settings = {"task": "arc_easy/validation", "format": "options", "batch_size": args.batch_size,
                "batches": len(batches), "questions": sum(len(b.labels) for b in batches),
                "last_layer_samples": SAMPLES, "passes": PASSES, "ensemble_members": MEMBERS, "prefix_cache": False,
                "layers": args.layers, "untrained": True}
    bench.write_result("inference_cost", args, settings, measurements, ratios, load)


if __name__ == "__main__":
    main()
