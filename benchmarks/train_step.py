"""Training step time: PoLAR-VBLL / LoRA-MLE at equal rank and targets (issue 8 target: <= 1.10).

Both methods come from ``bayes_polar.run.build_pipeline`` with the demo's settings (ARC-Easy,
options format, rank 8 on q_proj and v_proj of the top blocks, prefix cache on and warmed) and
each times ``method.train_step(batch, step)`` on the same minibatches, interleaved. PoLAR-VBLL's
step is a guide (SVI) step plus an adapter step (Riemannian Adam on X, Y; Adam on Θ); LoRA-MLE's
is one Adam step on A, B and the point head.

    python benchmarks/train_step.py                                  # tiny random Llama, seconds
    python benchmarks/train_step.py --model smollm2-135m --repeats 12
    python benchmarks/train_step.py --model random-llama-1b --device cuda --dtype bfloat16  # GPU only
"""
from __future__ import annotations

import _common as bench

TARGET = 1.10


def main(argv=None) -> None:
    parser = bench.base_parser(__doc__, repeats=10, batches=(4, "distinct minibatches"))
    args = parser.parse_args(argv)
    bench.setup(args)
    load = bench.load_now()
    from bayes_polar.training.loop import warm_prefix_cache

    limit = args.batches * args.batch_size
    pipes = {name: bench.pipeline(args, method=name, train_limit=limit, batch_size=args.batch_size)
             for name in ("lora-mle", "polar-vbll")}  # polar-vbll last: its head owns Pyro's param store
    for pipe in pipes.values():
        warm_prefix_cache(pipe.method, pipe.train, pipe.tokenizer, 16)
    batches = bench.batches(pipes["polar-vbll"].train, pipes["polar-vbll"].tokenizer, args.batch_size, args.batches)
    sides = {name: (lambda i, p=pipe: p.method.train_step(batches[i % len(batches)], i))
             for name, pipe in pipes.items()}
    samples = bench.interleaved(args, {"polar-vbll": sides["polar-vbll"], "lora-mle": sides["lora-mle"]},
                                args.repeats)
    config = pipes["polar-vbll"].config
    settings = {"task": config.task, "format": config.format, "layers": config.layers, "rank": config.rank,
                "target_modules": config.target_modules, "batch_size": args.batch_size, "batches": len(batches),
                "prefix_cache": config.prefix_cache, "elbo": config.elbo, "guide": config.guide,
                "sequences_per_batch": [int(b.input_ids.shape[0]) for b in batches],
                "tokens_per_batch": [list(b.input_ids.shape) for b in batches]}
    ratios = [bench.paired_ratio("polar_vbll_over_lora_mle_train_step", samples["polar-vbll"], samples["lora-mle"],
                                 TARGET)]
    bench.write_result("train_step", args, settings, {n: bench.timing(s) for n, s in samples.items()}, ratios, load)


if __name__ == "__main__":
    main()
