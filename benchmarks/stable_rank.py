"""Stable rank of PoLAR vs peft LoRA updates after the same short fine-tune of SmolLM2-135M.

Both methods adapt the same modules (q_proj, v_proj of the top blocks) at the same rank, see the
same batches in the same order and use the same optimiser settings (``make_adapter_optimizer``
``riemannian_adam``: Riemannian Adam on X, Y and Adam on Θ; plain Adam on LoRA's A, B). The
objective is a cross-entropy over the answer choices of ARC-Easy train (missing choices masked):

- ``options`` (default): class score = the LM's log-likelihood of the option text after
  "Question: ...\nAnswer:" (ℓ_sum of ``FeatureExtractor(model, "options")``);
- ``letters``: class score = φ Wᵀ, φ the final hidden state at the last prompt token and W the
  LM-head rows of " A", " B", ... (BLoB's prompt).

Stable rank ``‖ΔW‖_F² / ‖ΔW‖_2²`` per adapted layer comes from ``adapter_diagnostics``.

    python benchmarks/stable_rank.py --data-dir ../shared/data   # ~15 min on 1 thread
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "stable_rank.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m", help="load_backbone name (default: %(default)s)")
    parser.add_argument("--task", default="arc_easy", help="training task (default: %(default)s)")
    parser.add_argument("--data-dir", default=os.environ.get("BAYES_POLAR_DATA", str(REPO.parent / "shared" / "data")),
                        help="local benchmark data mirror (default: $BAYES_POLAR_DATA or ../shared/data)")
    parser.add_argument("--methods", default="polar,lora", help="comma list of polar, lora, polar_landing")
    parser.add_argument("--format", default="options", choices=("options", "letters"), help="answer format")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per method (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2, help="questions per step (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--top-blocks", type=int, default=4, help="adapt the last K transformer blocks")
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--lr", type=float, default=1e-3, help="same for every method and group")
    parser.add_argument("--max-length", type=int, default=256, help="prompt tokens kept (from the right)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def choice_loss(extractor, head_rows: torch.Tensor | None, batch) -> torch.Tensor:
    """Cross-entropy over the choices: scores (B, C) are φ Wᵀ (letters) or ℓ_sum (options)."""
    features = extractor(batch)
    if head_rows is None:
        logits = features.phi[..., -2]  # (B, C): options' summed log-likelihood
    else:
        logits = (features.phi @ head_rows.transpose(0, 1)).squeeze(1)  # (B, C)
    logits = logits.masked_fill(~features.mask, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, batch.labels)


def batches(loader, steps: int):
    """``steps`` batches, cycling over the loader (its own seeded shuffle, same for every method)."""
    done = 0
    while done < steps:
        for batch in loader:
            if done == steps:
                return
            yield batch
            done += 1


def adapt(model, method: str, args) -> None:
    from bayes_polar.adapters import inject_lora, inject_polar

    targets = args.targets.split(",")
    layers = list(range(-args.top_blocks, 0))
    torch.manual_seed(args.seed)  # adapter init
    if method.startswith("polar"):
        inject_polar(model, targets, rank=args.rank, alpha=args.alpha, layers=layers)
    else:
        inject_lora(model, targets, rank=args.rank, alpha=args.alpha, layers=layers)


def run_method(method: str, args, encoded) -> dict:
    from bayes_polar import FeatureExtractor, load_backbone, make_loader
    from bayes_polar.adapters import adapter_diagnostics, make_adapter_optimizer
    from bayes_polar.data.features import answer_head_rows

    model, tokenizer = load_backbone(args.backbone)
    head_rows = answer_head_rows(model, encoded.answer_ids) if args.format == "letters" else None  # (C, d)
    adapt(model, method, args)
    optimizer = make_adapter_optimizer(model, "landing" if method == "polar_landing" else "riemannian_adam", lr=args.lr)
    extractor = FeatureExtractor(model, args.format)
    loader = make_loader(encoded, tokenizer, batch_size=args.batch_size, shuffle=True, seed=args.seed)
    losses, start = [], time.perf_counter()
    model.train()
    for step, batch in enumerate(batches(loader, args.steps), start=1):
        optimizer.zero_grad(set_to_none=True)
        loss = choice_loss(extractor, head_rows, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f"{method} step {step}/{args.steps} loss(last 50) {statistics.fmean(losses[-50:]):.4f}", file=sys.stderr)
    return summarise(adapter_diagnostics(model), losses, time.perf_counter() - start)


def summarise(diagnostics: dict, losses: list[float], seconds: float) -> dict:
    ranks = [d["stable_rank"] for d in diagnostics.values()]
    window = min(25, len(losses))
    result = {
        "mean_stable_rank": statistics.fmean(ranks),
        "min_stable_rank": min(ranks),
        "max_stable_rank": max(ranks),
        "loss_first_25": statistics.fmean(losses[:window]),
        "loss_last_25": statistics.fmean(losses[-window:]),
        "train_seconds": round(seconds, 1),
        "layers": {name: {k: round(v, 6) for k, v in d.items()} for name, d in diagnostics.items()},
    }
    orthogonality = [max(d["orthogonality_error_X"], d["orthogonality_error_Y"]) for d in diagnostics.values()
                     if "orthogonality_error_X" in d]
    if orthogonality:
        result["max_orthogonality_error"] = max(orthogonality)
    return result


def settings(args, encoded) -> dict:
    import geoopt
    import peft
    import transformers

    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("data_dir", "out")}
    objective = {"letters": "cross-entropy on answer-letter logits phi @ W_head[letters].T",
                 "options": "cross-entropy on the summed log-likelihood of each option's text"}[args.format]
    values.update(split="train", train_examples=len(encoded), num_classes=encoded.num_classes, objective=objective,
                  optimizer="make_adapter_optimizer(name='riemannian_adam'; 'landing' for polar_landing)")
    values["versions"] = {"torch": torch.__version__, "peft": peft.__version__, "geoopt": geoopt.__version__,
                          "transformers": transformers.__version__}
    return values


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from bayes_polar import encode_task, load_task, load_tokenizer

    tokenizer = load_tokenizer(args.backbone)
    task = load_task(args.task, "train", data_dir=args.data_dir)
    encoded = encode_task(task, tokenizer, args.format, max_length=args.max_length)
    results = {method: run_method(method, args, encoded) for method in args.methods.split(",")}
    report = {"benchmark": "stable_rank", "settings": settings(args, encoded), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(" | ".join(f"{m}: stable rank {r['mean_stable_rank']:.2f} (min {r['min_stable_rank']:.2f}), "
                     f"loss {r['loss_first_25']:.3f}->{r['loss_last_25']:.3f}" for m, r in results.items())
          + f" | {args.steps} steps, r={args.rank}, top {args.top_blocks} blocks, {args.task} {args.format}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
