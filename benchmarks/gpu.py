"""GPU variant (issue 18 item 4): a ~1.1B random Llama in bfloat16, letters format, sequence 256, batch 8.

On ``--device cuda`` (the default) with ``_common.random_llama_1b`` (hidden 2048, 16 blocks, built
from a config: no download), every ratio of issue 8 at the size the paper's models have:

- ``train_step``: ``method.train_step`` of PoLAR-VBLL vs LoRA-MLE from ``build_pipeline`` (rank 8 on
  q_proj, v_proj of ``--layers``, prefix cache on and warmed, as ``bayes-polar fit`` runs), interleaved;
  target <= 1.10;
- ``predictive``: PoLAR-VBLL ``predict_proba(batch, S)`` (S = ``--samples``, 256) vs one deterministic
  pass (``head.point_proba(features)``), both a full backbone pass (``FullTrunk``); target <= 1.05. The
  head parts alone on fixed features give a low-noise estimate too (``predictive.head_only``); the last
  layer lives on the CPU, so ``--threads`` matters here;
- ``memory``: peak ``torch.cuda.max_memory_allocated`` of one worker process per side (build, warm the
  cache, ``--steps`` training steps); target <= 1.10. On the CPU there is no such counter: the GPU figure
  is null (with the reason) and the workers' peak RSS ratio is reported instead, without a target;
- ``forward``: tokens per second of the deterministic pass and its model-FLOPs utilisation, model FLOPs
  (``_common.block_flops`` over all blocks; the letters head reads one position, so no vocabulary
  projection) / seconds / peak. Peak: ``--peak-tflops`` (default on CUDA: 989, the dense bf16 figure of
  an H100 SXM, which the H200 shares), and a measured ``--matmul-size``-cubed matmul in the backbone's
  dtype, whose ratio is reported next to it (on the CPU that is the only peak, unless given).

Every prompt is an ARC-Easy training question in the letters format, left-extended with its own tokens
to exactly ``--seq-len`` (no padding). CUDA is synchronised around every timing; ``--warmup`` untimed
calls come first. ``--tiny`` is the CI size: the tiny random Llama, sequence 32, batch 2, small matmul.

    python benchmarks/gpu.py                                  # GPU machine: ~1-2 min
    python benchmarks/gpu.py --device cpu --tiny --dtype float32   # CI's smoke run (tiny Llama)
    benchmarks/gpu_check.sh                                   # tests/gpu + this, on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

import torch

import _common as bench
from predictive import head_only

TARGETS = {"train_step": 1.10, "predictive": 1.05, "memory": 1.10}
SIDES = ("polar-vbll", "lora-mle")
H100_SXM_BF16_DENSE_TFLOPS = 989.0


def fixed_length(encoded, length: int):
    """``encoded`` (letters) with every prompt exactly ``length`` tokens: its own tokens repeated on the
    left (the end, with ``Answer:``, is kept); a longer prompt keeps its last ``length`` tokens."""
    items = []
    for item in encoded.items:
        ids = list(item.sequences[0])
        ids = (ids * (length // len(ids) + 1))[-length:]
        items.append(replace(item, sequences=[ids]))
    return replace(encoded, items=items)


def build(args, method: str, backbone=None):
    """``build_pipeline`` (letters) on a fresh backbone, and its training set cut to exactly ``--seq-len``."""
    from bayes_polar.training.loop import warm_prefix_cache

    pipe = bench.pipeline(args, backbone, method=method, format="letters", max_length=max(512, args.seq_len),
                          batch_size=args.batch_size, train_limit=args.batches * args.batch_size, device=args.device,
                          dtype=args.dtype)
    data = fixed_length(pipe.train, args.seq_len)
    warm_prefix_cache(pipe.method, data, pipe.tokenizer, args.batch_size)
    return pipe, data


def worker(args) -> None:
    """One side of the memory comparison, in its own process: build, warm, ``--steps`` training steps."""
    backbone = bench.load_model(args)
    out = {"backbone_rss_mb": round(bench.peak_rss_mb(), 1)}
    if args.device == "cuda":  # the random init runs in float32 before the cast: keep that out of the peak
        out["backbone_cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        torch.cuda.reset_peak_memory_stats()
    pipe, data = build(args, args.worker, backbone)
    for i, batch in enumerate(bench.batches(data, pipe.tokenizer, args.batch_size, args.steps)):
        pipe.method.train_step(batch, i)
    bench.synchronize(args)
    out["peak_rss_mb"] = round(bench.peak_rss_mb(), 1)
    if args.device == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("RESULT " + json.dumps(out))


def measured_matmul_tflops(args) -> dict:
    """TFLOP/s of an n x n x n matmul in the backbone's dtype on the device (median of 5, after 3 warm-ups)."""
    n = args.matmul_size
    a, b = (torch.randn(n, n, device=args.device, dtype=getattr(torch, args.dtype)) for _ in range(2))
    times = bench.interleaved(args, {"matmul": lambda i: a @ b}, 5, warmup=3)["matmul"]
    return {"size": n, "tflops": round(2 * n**3 / statistics.median(times) / 1e12, 3), **bench.timing(times)}


def main(argv=None) -> None:
    parser = bench.base_parser(__doc__, repeats=10, batches=(4, "distinct minibatches"))
    parser.set_defaults(model="random-llama-1b", device="cuda", dtype="bfloat16")
    parser.add_argument("--tiny", action="store_true",
                        help="CI size: tiny random Llama, --seq-len 32, --batch-size 2, --matmul-size 256")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=256, help="last-layer draws S (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per side first (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per memory worker (default: %(default)s)")
    parser.add_argument("--memory-repeats", type=int, default=1, help="memory workers per side (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"device peak for MFU (default: {H100_SXM_BF16_DENSE_TFLOPS:g} on CUDA, dense bf16 of an "
                             "H100 SXM / H200; none on the CPU)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="n of the measured n^3 matmul (default: %(default)s)")
    parser.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.seq_len, args.batch_size, args.matmul_size = "tiny-random-llama", 32, 2, 256
    bench.setup(args)
    if args.worker:
        return worker(args)
    load = bench.load_now()
    from bayes_polar.data.features import FullTrunk

    # timings first, in one process (memory runs afterwards in fresh processes)
    pipes = {side: build(args, side) for side in SIDES[::-1]}  # polar-vbll last, as in train_step.py
    data, tokenizer = pipes["polar-vbll"][1], pipes["polar-vbll"][0].tokenizer
    batches = bench.batches(data, tokenizer, args.batch_size, args.batches)
    steps = bench.interleaved(args, {side: (lambda i, p=pipes[side][0]: p.method.train_step(batches[i % len(batches)], i))
                                     for side in SIDES}, args.repeats, args.warmup)

    polar = pipes["polar-vbll"][0]
    polar.method.extractor.trunk = FullTrunk(polar.model)  # prediction: a full pass (a deployed model sees new questions)
    method, S = polar.method, args.samples

    def pick(i):
        return batches[i % len(batches)]

    one_pass = bench.interleaved(args, {"deterministic": lambda i: method.head.point_proba(method.features(pick(i))),
                                        f"polar_vbll_S{S}": lambda i: method.predict_proba(pick(i), S)},
                                 args.repeats, args.warmup)
    head = head_only(args, polar, batches, samples=S)
    config = polar.model.config
    parameters = sum(p.numel() for p in polar.model.parameters() if not p.requires_grad)  # the frozen backbone
    del pipes, polar, method
    if args.device == "cuda":
        torch.cuda.empty_cache()
    matmul = measured_matmul_tflops(args)

    extra = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--batches", str(args.batches),
             "--steps", str(args.steps)]
    runs = {side: [] for side in SIDES}
    for i in range(args.memory_repeats):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            runs[side].append(bench.run_worker(__file__, side, args, *extra))
    memory = {side: {k: statistics.median(r[k] for r in runs[side]) for k in runs[side][0]} for side in SIDES}

    tokens = args.batch_size * args.seq_len
    query_keys = args.batch_size * args.seq_len * (args.seq_len + 1) // 2  # causal, no padding
    forward_flops = config.num_hidden_layers * bench.block_flops(config, tokens, query_keys)
    forward_s = statistics.median(one_pass["deterministic"])
    achieved = forward_flops / forward_s / 1e12
    peak = args.peak_tflops or (H100_SXM_BF16_DENSE_TFLOPS if args.device == "cuda" else None)

    ratios = [bench.paired_ratio("polar_vbll_over_lora_mle_train_step", steps["polar-vbll"], steps["lora-mle"],
                                 TARGETS["train_step"]),
              bench.paired_ratio(f"polar_vbll_S{S}_over_deterministic", one_pass[f"polar_vbll_S{S}"],
                                 one_pass["deterministic"], TARGETS["predictive"]),
              bench.ratio(f"polar_vbll_S{S}_over_deterministic_from_parts",
                          1 + (head[f"sampled_S{S}"] - head["point"]) / forward_s, 1.0, TARGETS["predictive"],
                          note=f"1 + (S={S} head - point head) / deterministic pass: the head parts timed alone on "
                               "fixed features (on the CPU, where the last layer lives)")]
    memory_note = None
    if args.device == "cuda":
        ratios.append(bench.ratio("polar_vbll_over_lora_mle_cuda_peak", memory["polar-vbll"]["cuda_max_allocated_mb"],
                                  memory["lora-mle"]["cuda_max_allocated_mb"], TARGETS["memory"]))
    else:
        memory_note = "no torch.cuda.max_memory_allocated on the CPU; peak RSS of the workers instead (no target)"
        ratios.append(bench.ratio("polar_vbll_over_lora_mle_peak_rss", memory["polar-vbll"]["peak_rss_mb"],
                                  memory["lora-mle"]["peak_rss_mb"], note=memory_note))
    if peak is not None:
        ratios.append(bench.ratio("forward_mfu", achieved, peak,
                                  note=f"model FLOPs/s of the deterministic pass / {peak:g} TFLOP/s"))
    ratios.append(bench.ratio("forward_flops_over_measured_matmul", achieved, matmul["tflops"],
                              note=f"model FLOPs/s of the deterministic pass / a measured {matmul['size']}^3 matmul"))

    measurements = {"train_step": {n: bench.timing(s) for n, s in steps.items()},
                    "one_pass": {n: bench.timing(s) for n, s in one_pass.items()},
                    "head_only_median_s": head,
                    "train_step_tokens_per_s": {n: round(tokens / statistics.median(s), 1) for n, s in steps.items()},
                    "forward": {"tokens": tokens, "tokens_per_s": round(tokens / forward_s, 1),
                                "model_gflops": round(forward_flops / 1e9, 3), "achieved_tflops": round(achieved, 4),
                                "peak_tflops": peak, "mfu": None if peak is None else round(achieved / peak, 4)},
                    "measured_matmul": matmul,
                    "memory": {"runs": runs, "median": memory,
                               "cuda_max_allocated_ratio": (None if args.device != "cuda" else
                                                            round(memory["polar-vbll"]["cuda_max_allocated_mb"]
                                                                  / memory["lora-mle"]["cuda_max_allocated_mb"], 3)),
                               "cuda_max_allocated_reason": memory_note}}
    if args.device == "cuda":
        measurements["gpu_memory_total_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    settings = {"task": "arc_easy/train", "format": "letters", "seq_len": args.seq_len, "batch_size": args.batch_size,
                "batches": len(batches), "layers": args.layers, "rank": 8, "target_modules": "q_proj,v_proj",
                "samples": S, "warmup": args.warmup, "memory_steps": args.steps,
                "backbone_parameters": parameters,
                "prompt": "ARC-Easy letters prompt left-extended with its own tokens to seq_len (no padding)"}
    bench.write_result("gpu", args, settings, measurements, ratios, load)


if __name__ == "__main__":
    main()
