"""Frozen prefix pass: model FLOPs/s of the cache fill against a plain matmul of the block's shapes,
with its padding and per-option repetition (issue 18 target: FLOPs/s ratio >= 0.5).

Most of ``make demo``'s CPU time is the prefix-cache fill: ARC-Easy train and validation questions
(options format, max_length 128, 16 questions per batch as ``run_fit`` warms them) through the frozen
blocks below the first adapted one (28 of SmolLM2's 30 at the demo's ``--layers -2,-1``). Side by side
in one process, at one thread count, interleaved (A B C, C B A, ...):

- ``length_sorted``: ``CachedTrunk.warm_task`` per split (what runs now: questions bucketed by length);
- ``loader_order``: ``CachedTrunk.warm`` over ``make_loader`` per split (the order before issue 18);
- ``matmul``: the linear layers of every frozen block (q, k, v, o, gate, up, down, their real weights)
  as plain ``x @ W.T`` in the backbone's dtype on M rows, M = the median positions per pass of the
  sorted fill: what the hardware gives the block's shapes with no model around them.

Model FLOPs (``_common.block_flops``) count each real token the fill computes once: its linear layers
and its attention over the real keys it sees; a ratio is model FLOPs/s of a fill over the matmul's
FLOPs/s, the median of per-repeat ratios. Padding fraction = padded positions / positions the passes
ran. Repetition: real tokens run more than once for one question (a node of the question's token trie
computed twice), as a fraction of positions run; the context shared across options (the cache's default)
leaves only options that start alike, the per-sequence fill (``share_prefix=False``) is shown for scale.

``--questions N`` takes the first N questions of each split (0: all, as the demo does).

    python benchmarks/frozen_pass.py                                  # tiny random Llama, seconds
    python benchmarks/frozen_pass.py --model smollm2-135m --repeats 3  # 200 + 200 questions
"""
from __future__ import annotations

import statistics
import time

import torch

import _common as bench

TARGET = 0.5
SPLITS = ("train", "validation")
ORDERS = ("length_sorted", "loader_order")


class PassRecorder:
    """Wraps ``trunk._lower`` and counts, per pass through the lower blocks, what it ran."""

    def __init__(self, trunk):
        self.passes = []
        self.original = trunk._lower
        trunk._lower = self

    def __call__(self, input_ids, attention_mask, *args, **kwargs):
        rows, width = input_ids.shape
        mask = attention_mask.long()  # (rows, cached + width): with a key/value cache, the cached columns first
        visible = mask.cumsum(-1)[:, -width:]  # real keys a position sees (causal)
        new = mask[:, -width:].bool()
        cached = mask.shape[1] - width
        self.passes.append({"rows": rows, "width": width, "real": int(new.sum()),
                            "real_query_keys": int(visible[new].sum()),
                            "query_keys": rows * sum(cached + t + 1 for t in range(width))})
        return self.original(input_ids, attention_mask, *args, **kwargs)

    def totals(self) -> dict:
        keys = ("rows", "real", "real_query_keys", "query_keys")
        out = {k: sum(p[k] for p in self.passes) for k in keys}
        out["positions"] = sum(p["rows"] * p["width"] for p in self.passes)
        out["passes"] = len(self.passes)
        out["padding_fraction"] = round(1 - out["real"] / out["positions"], 4)
        return out


def trie_size(sequences: list[list[int]]) -> int:
    """Distinct token prefixes of ``sequences``: the tokens a fill must compute at least once."""
    root, size = {}, 0
    for seq in sequences:
        node = root
        for token in seq:
            if token not in node:
                node[token] = {}
                size += 1
            node = node[token]
    return size


def matmul_side(model, start: int, rows: int, dtype: torch.dtype):
    """Plain ``x @ W.T`` of every linear layer of blocks < ``start``, on ``rows`` rows; and its FLOPs."""
    from bayes_polar.adapters.inject import find_blocks

    _, blocks = find_blocks(model)
    shapes = bench.linear_shapes(model.config)
    device = model.get_input_embeddings().weight.device
    inputs = {size: torch.randn(rows, size, dtype=dtype, device=device) for size in {a for a, _ in shapes.values()}}
    weights = [(inputs[shapes[name][0]], blocks[b].get_submodule(name).weight.detach())
               for b in range(start) for name in shapes]
    flops = 2.0 * rows * sum(w.shape[0] * w.shape[1] for _, w in weights)

    @torch.no_grad()
    def side(i):
        for x, w in weights:
            x @ w.T
    return side, flops


def main(argv=None) -> None:
    parser = bench.base_parser(__doc__, repeats=3)
    parser.add_argument("--questions", type=int, default=200,
                        help="first N questions of each of ARC-Easy train and validation (0: all; default: %(default)s)")
    parser.add_argument("--fill-batch", type=int, default=16,
                        help="questions per fill batch (run_fit's eval_batch_size; default: %(default)s)")
    args = parser.parse_args(argv)
    bench.setup(args)
    load = bench.load_now()
    from bayes_polar.data.formats import encode_task, make_loader
    from bayes_polar.data.prefix_cache import CachedTrunk
    from bayes_polar.data.tasks import load_task
    from bayes_polar.training.methods import first_adapted_block
    from prefix_cache import compare_stores

    config = bench.fit_config(args)
    model, tokenizer = bench.load_model(args)
    start = first_adapted_block(model, config.layer_indices)
    limit = args.questions or None
    splits = [encode_task(load_task(config.task, split, limit=limit), tokenizer, config.format, config.max_length)
              for split in SPLITS]
    recorders, filled, matmul = {}, {}, {}

    def fill(order):
        def side(i):
            trunk = CachedTrunk(model, start)
            recorders[order] = PassRecorder(trunk)  # every fill is counted (a few tensor ops per pass)
            for encoded in splits:
                if order == "length_sorted":
                    trunk.warm_task(encoded, tokenizer, args.fill_batch)
                else:
                    trunk.warm(make_loader(encoded, tokenizer, batch_size=args.fill_batch))
            filled[order] = trunk
        return side

    def matmul_timed(i) -> float:
        if not matmul:  # built once the sorted fill has run (it sets M); the first call warms up
            rows = int(statistics.median(p["rows"] * p["width"] for p in recorders["length_sorted"].passes))
            side, flops = matmul_side(model, start, rows, getattr(torch, args.dtype))
            side(i)
            matmul.update(side=side, flops=flops, rows=rows)
        bench.synchronize(args)
        began = time.perf_counter()
        matmul["side"](i)
        bench.synchronize(args)
        return time.perf_counter() - began

    warm = CachedTrunk(model, start)  # warm-up: one batch through the lower blocks (kernels, allocations)
    warm.warm([next(iter(make_loader(splits[0], tokenizer, batch_size=args.fill_batch)))])
    sides = {**{order: fill(order) for order in ORDERS}, "matmul": matmul_timed}  # sorted first: it sets M
    samples = bench.interleaved(args, sides, args.repeats, warmup=0)
    matmul_flops, rows = matmul["flops"], matmul["rows"]

    counts = {order: recorders[order].totals() for order in ORDERS}
    model_flops = {order: start * bench.block_flops(model.config, c["real"], c["real_query_keys"])
                   for order, c in counts.items()}  # the same in both orders: each real token once
    executed = {order: start * bench.block_flops(model.config, c["positions"], c["query_keys"])
                for order, c in counts.items()}
    matmul_rate = [matmul_flops / t for t in samples["matmul"]]

    def rate(order, flops):
        return [flops[order] / t for t in samples[order]]

    per_question = [item.sequences for encoded in splits for item in encoded.items]
    unique = sum(trie_size(q) for q in per_question)
    per_sequence_real = sum(len(s) for q in per_question for s in q)
    shared_real, positions = counts["length_sorted"]["real"], counts["length_sorted"]["positions"]
    repetition = {"unique_tokens": unique,
                  "shared_context": {"real_tokens_run": shared_real, "repeated_tokens": shared_real - unique,
                                     "fraction_of_positions": round((shared_real - unique) / positions, 4)},
                  "per_sequence_reference": {"real_tokens_run": per_sequence_real,
                                             "repeated_tokens": per_sequence_real - unique,
                                             "fraction_of_real_tokens": round(1 - unique / per_sequence_real, 4)}}

    def padding(order, note):
        c = counts[order]
        return bench.ratio(f"padding_fraction_{order}", c["positions"] - c["real"], c["positions"], note=note)

    ratios = [bench.paired_ratio("frozen_pass_model_flops_over_matmul", rate("length_sorted", model_flops),
                                 matmul_rate, TARGET, sense=">="),
              bench.paired_ratio("frozen_pass_model_flops_over_matmul_loader_order",
                                 rate("loader_order", model_flops), matmul_rate),
              bench.paired_ratio("frozen_pass_executed_flops_over_matmul", rate("length_sorted", executed),
                                 matmul_rate),
              bench.paired_ratio("loader_order_over_length_sorted_fill", samples["loader_order"],
                                 samples["length_sorted"]),
              padding("length_sorted", "padded positions / positions run, after (CachedTrunk.warm_task)"),
              padding("loader_order", "padded positions / positions run, before (make_loader's order)"),
              bench.ratio("repetition_fraction_shared_context", shared_real - unique, positions,
                          note="real tokens run more than once for one question / positions run")]
    questions = sum(len(e) for e in splits)
    med = {n: statistics.median(s) for n, s in samples.items()}
    measurements = {name: bench.timing(s) for name, s in samples.items()}
    measurements.update({
        "passes": counts, "repetition": repetition, "model_gflops": round(model_flops["length_sorted"] / 1e9, 3),
        "executed_gflops": {k: round(v / 1e9, 3) for k, v in executed.items()},
        "matmul_shape": {"rows": rows, "gflops": round(matmul_flops / 1e9, 3)},
        "gflops_per_s": {**{f"{order}_model": round(model_flops[order] / med[order] / 1e9, 2) for order in ORDERS},
                         **{f"{order}_executed": round(executed[order] / med[order] / 1e9, 2) for order in ORDERS},
                         "matmul": round(matmul_flops / med["matmul"] / 1e9, 2)},
        "seconds_per_question": {order: round(med[order] / questions, 4) for order in ORDERS},
        "store_agreement": compare_stores(filled["length_sorted"], filled["loader_order"])})
    settings = {"task": f"{config.task}/{'+'.join(SPLITS)}", "format": config.format, "max_length": config.max_length,
                "questions": {split: len(e) for split, e in zip(SPLITS, splits)}, "fill_batch": args.fill_batch,
                "layers": args.layers, "frozen_blocks": start, "sequences": sum(len(q) for q in per_question)}
    bench.write_result("frozen_pass", args, settings, measurements, ratios, load)


if __name__ == "__main__":
    main()
