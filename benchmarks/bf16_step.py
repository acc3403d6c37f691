"""CPU training step with the backbone in bfloat16 vs float32 (issue 18 target: bf16 step <= 1.5 x fp32).

Two PoLAR-VBLL pipelines from ``build_pipeline`` with the demo's settings (ARC-Easy, options, rank 8
on q_proj and v_proj of the top blocks, prefix cache on and warmed), one per backbone dtype (adapters and
the head are float32 in both), time ``method.train_step(batch, step)`` on the same minibatches,
interleaved. Also timed: the prefix-cache fill (``CachedTrunk.warm_task``, ``--fill-questions`` ARC-Easy
training questions; what dominates ``make demo``) in each dtype, and how far the bf16 features are
from the fp32 ones on one batch (``max_abs_diff`` relative to the largest feature).

``--dtype`` is not used: both dtypes run. Whether bf16 is fast on a CPU depends on its instructions
(``machine.cpu_flags`` records ``avx512_bf16`` / ``amx_bf16``) and on oneDNN picking them.

    python benchmarks/bf16_step.py                                   # tiny random Llama, seconds
    python benchmarks/bf16_step.py --model smollm2-135m --repeats 8
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import _common as bench

TARGET = 1.5
DTYPES = ("bfloat16", "float32")


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f in ("avx512f", "avx2"))


def main(argv=None) -> None:
    parser = bench.base_parser(__doc__, repeats=8, batches=(4, "distinct minibatches"))
    parser.add_argument("--fill-questions", type=int, default=32,
                        help="training questions per timed cache fill (default: %(default)s)")
    parser.add_argument("--fill-repeats", type=int, default=2, help="timed fills per dtype (default: %(default)s)")
    args = parser.parse_args(argv)
    bench.setup(args)
    load = bench.load_now()
    from bayes_polar.data.prefix_cache import CachedTrunk
    from bayes_polar.training.loop import warm_prefix_cache
    from bayes_polar.training.methods import first_adapted_block

    limit = max(args.batches * args.batch_size, args.fill_questions)
    pipes = {}
    for dtype in DTYPES:  # the same seed, data and adapters' init in both; only the backbone's dtype differs
        side_args = argparse.Namespace(**{**vars(args), "dtype": dtype})
        pipes[dtype] = bench.pipeline(side_args, backbone=bench.load_model(side_args), method="polar-vbll",
                                      train_limit=limit, batch_size=args.batch_size, dtype=dtype)
        warm_prefix_cache(pipes[dtype].method, pipes[dtype].train, pipes[dtype].tokenizer, 16)
    reference = pipes["float32"]
    batches = bench.batches(reference.train, reference.tokenizer, args.batch_size, args.batches)
    with torch.no_grad():
        phi = {dtype: pipe.method.extractor.raw(batches[0]).phi for dtype, pipe in pipes.items()}
    scale = phi["float32"].abs().max().item()
    agreement = {"max_abs_diff": (phi["bfloat16"] - phi["float32"]).abs().max().item(), "max_abs_feature": scale}
    agreement["max_rel_diff"] = agreement["max_abs_diff"] / scale
    steps = bench.interleaved(args, {dtype: (lambda i, p=pipe: p.method.train_step(batches[i % len(batches)], i))
                                     for dtype, pipe in pipes.items()}, args.repeats)

    questions = reference.train.items[: args.fill_questions]
    encoded = replace(reference.train, items=questions)

    def fill(dtype):
        model = pipes[dtype].model
        start = first_adapted_block(model, pipes[dtype].config.layer_indices)
        return lambda i: CachedTrunk(model, start).warm_task(encoded, reference.tokenizer, 16)

    fills = bench.interleaved(args, {dtype: fill(dtype) for dtype in DTYPES}, args.fill_repeats)
    ratios = [bench.paired_ratio("bf16_over_fp32_train_step", steps["bfloat16"], steps["float32"], TARGET),
              bench.paired_ratio("bf16_over_fp32_cache_fill", fills["bfloat16"], fills["float32"])]
    measurements = {"train_step": {d: bench.timing(s) for d, s in steps.items()},
                    "fill": {d: bench.timing(s) for d, s in fills.items()},
                    "feature_agreement": agreement, "cpu_flags": cpu_flags()}
    config = reference.config
    settings = {"task": config.task, "format": config.format, "method": "polar-vbll", "layers": config.layers,
                "rank": config.rank, "batch_size": args.batch_size, "batches": len(batches),
                "prefix_cache": config.prefix_cache, "cache_dtype": config.cache_dtype,
                "fill_questions": len(questions), "dtypes": list(DTYPES)}
    args.dtype = "bfloat16+float32"
    bench.write_result("bf16_step", args, settings, measurements, ratios, load)


if __name__ == "__main__":
    main()
