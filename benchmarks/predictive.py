"""Prediction time: PoLAR-VBLL with S = 100 last-layer samples vs one deterministic pass, and
MC-dropout with N = 10 passes vs PoLAR-VBLL (issue 8 targets: <= 1.05 and >= 8).

All sides predict the same ARC-Easy validation batches with a full backbone pass (prefix cache
off: a deployed model sees new questions); the one-pass pair and the MC-dropout pair are timed
in two interleaved runs (``--repeats``, ``--mc-repeats``). The last layer alone is also timed on
fixed features (point vs 100 draws), which gives a low-noise estimate of the first ratio.

- ``deterministic``: ``method.head.point_proba(method.features(batch))`` of PoLAR-VBLL: one pass, softmax at the mean;
- ``polar_vbll_S100``: ``method.predict_proba(batch, 100)``: one pass, 100 logit draws;
- ``mc_dropout_N10``: ``lora-mcdropout`` with ``mc_passes=10``: ten passes with dropout on.

    python benchmarks/predictive.py
    python benchmarks/predictive.py --model smollm2-135m --batch-size 4 --repeats 8 --mc-repeats 3
"""
from __future__ import annotations

import statistics

import _common as bench

SAMPLES, PASSES = 100, 10


def head_only(args, polar, batches, repeats: int = 50, samples: int = SAMPLES) -> dict:
    """Median seconds of the last layer alone on fixed features: point softmax vs S = ``samples`` draws."""
    head = polar.method.head
    features = polar.method.features(batches[0])
    times = bench.interleaved(args, {"point": lambda i: head.point_proba(features),
                                     f"sampled_S{samples}": lambda i: head.predict_proba(features, samples)}, repeats)
    return {name: statistics.median(s) for name, s in times.items()}


def main(argv=None) -> None:
    parser = bench.base_parser(__doc__, repeats=10, batches=(3, "distinct validation batches"))
    parser.add_argument("--mc-repeats", type=int, default=3, help="repeats of the MC-dropout comparison (default: %(default)s)")
    args = parser.parse_args(argv)
    bench.setup(args)
    load = bench.load_now()
    from bayes_polar.data.formats import make_loader
    from bayes_polar.run import encode_eval

    common = dict(train_limit=16, prefix_cache=False)
    mcd = bench.pipeline(args, method="lora-mcdropout", mc_passes=PASSES, **common)
    polar = bench.pipeline(args, method="polar-vbll", **common)  # last: its head owns Pyro's param store
    encoded = encode_eval(polar, "arc_easy", "validation", limit=args.batches * args.batch_size)
    batches = list(make_loader(encoded, polar.tokenizer, batch_size=args.batch_size))

    def pick(i):
        return batches[i % len(batches)]

    sides = {"deterministic": lambda i: polar.method.head.point_proba(polar.method.features(pick(i))),
             "polar_vbll_S100": lambda i: polar.method.predict_proba(pick(i), SAMPLES),
             "mc_dropout_N10": lambda i: mcd.method.predict_proba(pick(i), SAMPLES)}
    one_pass = bench.interleaved(args, {k: sides[k] for k in ("deterministic", "polar_vbll_S100")}, args.repeats)
    ten_passes = bench.interleaved(args, {k: sides[k] for k in ("polar_vbll_S100", "mc_dropout_N10")},
                                   args.mc_repeats)
    head = head_only(args, polar, batches)
    ratios = [bench.paired_ratio("polar_vbll_S100_over_deterministic", one_pass["polar_vbll_S100"],
                                 one_pass["deterministic"], 1.05),
              bench.ratio("polar_vbll_S100_over_deterministic_from_parts",
                          1 + (head["sampled_S100"] - head["point"]) / statistics.median(one_pass["deterministic"]),
                          1.0, 1.05, note="1 + (S=100 head - point head) / deterministic pass: the head parts "
                                          "timed alone on fixed features, far less noisy than whole passes"),
              bench.paired_ratio("mc_dropout_N10_over_polar_vbll_S100", ten_passes["mc_dropout_N10"],
                                 ten_passes["polar_vbll_S100"], 8, sense=">=")]
    measurements = {"one_pass": {n: bench.timing(s) for n, s in one_pass.items()},
                    "ten_passes": {n: bench.timing(s) for n, s in ten_passes.items()},
                    "head_only_median_s": head}
    settings = {"task": "arc_easy/validation", "format": "options", "batch_size": args.batch_size,
                "batches": len(batches), "last_layer_samples": SAMPLES, "mc_dropout_passes": PASSES,
                "prefix_cache": False, "layers": args.layers}
    bench.write_result("predictive", args, settings, measurements, ratios, load)


if __name__ == "__main__":
    main()
