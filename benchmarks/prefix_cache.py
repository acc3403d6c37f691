"""Prefix caching: cached vs uncached PoLAR-VBLL training step, and the cache fill with the
question context shared across options vs every option sequence run in full.

1. ``train_step``: one ``build_pipeline`` method whose feature extractor runs on the warmed
   ``CachedTrunk`` or on ``FullTrunk`` (all blocks), alternately on the same minibatches;
   speed-up = uncached / cached.
2. ``fill``: fresh ``CachedTrunk(model, k, share_prefix=...)`` warmed over the same ARC-Easy
   questions (batches of 16 questions in the loader's order; ``run_fit`` fills in length-bucketed order,
   ``CachedTrunk.warm_task``, whose gain ``frozen_pass.py`` measures); speed-up = per-sequence / shared.
   The two stores are compared (max absolute and relative difference of the cached states).

Issue 8 sets no numeric target for these speed-ups (its goal is the ~10 min demo); they are
reported with ``target: null``.

    python benchmarks/prefix_cache.py
    python benchmarks/prefix_cache.py --model smollm2-135m --repeats 6 --fill-questions 48 --fill-repeats 3
"""
from __future__ import annotations

import _common as bench


def compare_stores(a, b) -> dict:
    abs_diff = max((a.store[k].float() - b.store[k].float()).abs().max().item() for k in a.store)
    scale = max(b.store[k].float().abs().max().item() for k in b.store)
    return {"max_abs_diff": abs_diff, "max_abs_state": scale, "max_rel_diff": abs_diff / scale,
            "sequences": len(a.store), "same_keys": set(a.store) == set(b.store)}


def main(argv=None) -> None:
    parser = bench.base_parser(__doc__, repeats=10, batches=(4, "training minibatches"))
    parser.add_argument("--fill-questions", type=int, default=64, help="questions per cache fill (default: %(default)s)")
    parser.add_argument("--fill-repeats", type=int, default=5, help="timed fills per side (default: %(default)s)")
    args = parser.parse_args(argv)
    bench.setup(args)
    load = bench.load_now()
    from bayes_polar.data.features import FullTrunk
    from bayes_polar.data.formats import make_loader
    from bayes_polar.training.methods import first_adapted_block
    from bayes_polar.data.prefix_cache import CachedTrunk
    from bayes_polar.training.loop import warm_prefix_cache

    limit = max(args.batches * args.batch_size, args.fill_questions)
    pipe = bench.pipeline(args, method="polar-vbll", train_limit=limit)
    extractor = pipe.method.extractor
    trunks = {"cached": extractor.trunk, "uncached": FullTrunk(pipe.model)}  # one method, two trunks
    warm_prefix_cache(pipe.method, pipe.train, pipe.tokenizer, 16)
    batches = bench.batches(pipe.train, pipe.tokenizer, args.batch_size, args.batches)

    def train_step(name):
        def side(i):
            extractor.trunk = trunks[name]
            pipe.method.train_step(batches[i % len(batches)], i)
        return side

    step = bench.interleaved(args, {name: train_step(name) for name in trunks}, args.repeats)
    extractor.trunk = trunks["cached"]

    start = first_adapted_block(pipe.model, pipe.config.layer_indices)
    questions = pipe.train.items[: args.fill_questions]
    loader = make_loader(pipe.train, pipe.tokenizer, batch_size=16)
    loader = [b for b, _ in zip(loader, range((len(questions) + 15) // 16))]
    filled = {}

    def fill(share):
        def side(i):
            filled[share] = CachedTrunk(pipe.model, start, share_prefix=share)
            filled[share].warm(loader)
        return side

    fills = bench.interleaved(args, {"shared_context": fill(True), "per_sequence": fill(False)}, args.fill_repeats)
    med = {n: bench.timing(s)["median_s"] for n, s in {**step, **fills}.items()}
    ratios = [bench.paired_ratio("uncached_over_cached_train_step", step["uncached"], step["cached"]),
              bench.paired_ratio("per_sequence_over_shared_context_fill", fills["per_sequence"], fills["shared_context"])]
    measurements = {"train_step": {n: bench.timing(s) for n, s in step.items()},
                    "fill": {n: bench.timing(s) for n, s in fills.items()},
                    "fill_seconds_per_question": {n: round(med[n] / len(questions), 4)
                                                  for n in ("shared_context", "per_sequence")},
                    "fill_agreement": compare_stores(filled[True], filled[False])}
    settings = {"task": "arc_easy/train", "format": "options", "layers": args.layers, "start_layer": start,
                "batch_size": args.batch_size, "batches": len(batches), "fill_questions": len(questions),
                "fill_sequences": sum(len(q.sequences) for q in questions), "fill_batch_questions": 16}
    bench.write_result("prefix_cache", args, settings, measurements, ratios, load)


if __name__ == "__main__":
    main()
