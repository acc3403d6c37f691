"""Shared plumbing of the speed and memory benchmarks: options, backbones, interleaved timing, JSON.

Every benchmark times both sides of each ratio in one process (RSS: one subprocess per side),
interleaved (A B, B A, A B, ...) after a warm-up, on the same input per repeat, and reports
medians; a time ratio is the median of the per-repeat ratios (the ratio of medians is kept too). Results go to
``benchmarks/results/<name>.json`` for the real model (``<name>-<model>.json`` otherwise, so a
quick default run never overwrites the committed SmolLM2 numbers) with the command line, the
machine and every ratio with its target and ``met``; the last printed line is a summary.

``--device cuda --dtype bfloat16 --model random-llama-1b`` is the GPU variant (a ~1.1B Llama with
random weights built from a config); it stops at once, with a message, where CUDA is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = ("tiny-random-llama", "smollm2-135m", "random-llama-1b")
DEFAULT_LAYERS = {"tiny-random-llama": "-1", "smollm2-135m": "-2,-1", "random-llama-1b": "-2,-1"}


def base_parser(doc: str, repeats: int = 5, batches: tuple[int, str] | None = None) -> argparse.ArgumentParser:
    """Options every benchmark shares; ``batches=(count, what)`` adds ``--batches`` and ``--batch-size``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=_epilog(doc),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random-llama", choices=MODELS,
                        help="backbone (default: %(default)s; random-llama-1b: the GPU variant)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: %(default)s")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="backbone dtype (adapters and head stay float32; default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, pinned (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats per side (default: %(default)s)")
    parser.add_argument("--layers", default=None,
                        help="adapted blocks (default: -1 on the tiny Llama, -2,-1 otherwise: the demo's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/...)")
    if batches is not None:
        count, what = batches
        parser.add_argument("--batches", type=int, default=count, help=f"{what}, cycled (default: %(default)s)")
        parser.add_argument("--batch-size", type=int, default=8, help="questions per batch (default: %(default)s)")
    return parser


def _epilog(doc: str) -> str:
    rest = doc.split("\n\n", 1)
    return rest[1] if len(rest) > 1 else ""


def setup(args) -> None:
    """Pin threads; stop at once (exit status 1) when CUDA is asked for and absent."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device cuda needs a CUDA GPU, and torch {torch.__version__} finds none on this "
                 "machine (torch.cuda.is_available() is False); run the GPU variant on a GPU machine, "
                 "or drop --device cuda")
    if args.layers is None:
        args.layers = DEFAULT_LAYERS[args.model]
    torch.set_num_threads(args.threads)


def load_model(args):
    """``(model, tokenizer)``: the frozen backbone of ``--model`` on ``--device`` in ``--dtype``."""
    from bayes_polar.data.backbone import load_backbone, load_tokenizer

    dtype = getattr(torch, args.dtype)
    if args.model == "random-llama-1b":
        model, tokenizer = random_llama_1b(load_tokenizer(), args.device, dtype), load_tokenizer()
    else:
        model, tokenizer = load_backbone(args.model)
        model.to(device=args.device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def random_llama_1b(tokenizer, device: str, dtype: torch.dtype):
    """A Llama of ~1.1B parameters (hidden 2048, 16 blocks, GQA 32/8 heads) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def fit_config(args, **overrides):
    """The demo's settings (ARC-Easy, options, rank 8 on q_proj/v_proj) for the benchmark's backbone."""
    from bayes_polar.config import FitConfig

    values = dict(model=args.model, task="arc_easy", format="options", max_length=128, batch_size=8,
                  layers=args.layers, rank=8, alpha=16.0, threads=args.threads, steps=1000, warmup_steps=0)
    values.update(overrides)
    return FitConfig(**values)


def pipeline(args, backbone=None, **overrides):
    """``build_pipeline`` for :func:`fit_config` on a freshly loaded backbone."""
    from bayes_polar.run import build_pipeline

    return build_pipeline(fit_config(args, **overrides), backbone=backbone or load_model(args))


def batches(encoded, tokenizer, batch_size: int, count: int, seed: int = 0) -> list:
    """The first ``count`` minibatches of one seeded epoch (the same for every side)."""
    from bayes_polar.training.loop import epoch_loader

    loader = epoch_loader(encoded, tokenizer, batch_size, seed)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            break
    return out


def synchronize(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def interleaved(args, sides: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each ``side(i)``, alternating the order every repeat (A B, B A, ...).

    A side that returns a float has timed itself (to leave its own set-up out); that is used.
    """
    names = list(sides)
    for i in range(warmup):
        for name in names:
            sides[name](i)
    samples = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            synchronize(args)
            start = time.perf_counter()
            seconds = sides[name](warmup + i)
            synchronize(args)
            samples[name].append(seconds if isinstance(seconds, float) else time.perf_counter() - start)
    return samples


def timing(samples: list[float]) -> dict:
    return {"median_s": round(statistics.median(samples), 6), "min_s": round(min(samples), 6),
            "max_s": round(max(samples), 6), "samples_s": [round(s, 6) for s in samples]}


def ratio(name: str, numerator: float, denominator: float, target: float | None = None, sense: str = "<=",
          note: str = "") -> dict:
    """``numerator / denominator`` with its target (``<= t`` or ``>= t``; None: issue 8 sets none)."""
    value = numerator / denominator
    met = None if target is None else bool(value <= target if sense == "<=" else value >= target)
    entry = {"name": name, "value": round(value, 3), "target": None if target is None else f"{sense} {target}",
             "met": met}
    if note:
        entry["note"] = note
    return entry


def paired_ratio(name: str, numerator: list[float], denominator: list[float], target: float | None = None,
                 sense: str = "<=") -> dict:
    """Median over repeats of ``numerator[i] / denominator[i]``: both ran back to back on the same input,
    so the pairs cancel input-to-input variation and slow drifts of a shared machine's load."""
    value = statistics.median(a / b for a, b in zip(numerator, denominator))
    entry = ratio(name, value, 1.0, target, sense, note="median of per-repeat ratios (same input, back to back)")
    entry["ratio_of_medians"] = round(statistics.median(numerator) / statistics.median(denominator), 3)
    return entry


def machine(args) -> dict:
    import transformers

    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype,
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script.name
    return " ".join(["python", str(shown), *sys.argv[1:]])


def write_result(name: str, args, settings: dict, measurements: dict, ratios: list[dict],
                 started_load: list[float]) -> Path:
    """Write the JSON and print one summary line (last)."""
    suffix = "" if args.model == "smollm2-135m" else f"-{args.model}"
    path = args.out or RESULTS / f"{name}{suffix}.json"
    info = machine(args)
    info["load_average_at_start"] = started_load
    result = {"benchmark": name, "command": command_line(), "model": args.model, "machine": info,
              "settings": settings, "measurements": measurements, "ratios": ratios}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    parts = [f"{r['name']}={r['value']}" + ("" if r["met"] is None else f" ({r['target']}: "
                                             f"{'met' if r['met'] else 'NOT met'})") for r in ratios]
    print(f"{name} [{args.model}, {args.device}, {args.threads} thread(s)]: " + "; ".join(parts) + f" -> {path.name}")
    return path


LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of one Llama block's linear layers, from the model config."""
    h, i = config.hidden_size, config.intermediate_size
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return dict(zip(LLAMA_LINEARS, shapes))


def block_flops(config, tokens: int, query_keys: int) -> float:
    """Model FLOPs of one Llama block on ``tokens`` positions that see ``query_keys`` (query, key) pairs in all.

    Linear layers: 2 * in * out per position; attention: 4 * heads * head_dim per (query, visible key)
    pair (Q Kᵀ, then the weighted sum of V). Norms, rotary embeddings, softmax and SiLU are not counted
    (the usual convention); adapters are not either (under 0.1% at rank 8).
    """
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    linear = 2 * sum(a * b for a, b in linear_shapes(config).values())
    return float(linear * tokens + 4 * config.num_attention_heads * head * query_keys)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (``ru_maxrss``; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_worker(script: str, side: str, args, *extra: str) -> dict:
    """Run ``script --worker side`` in its own process (RSS is per process); its last ``RESULT {json}`` line."""
    import subprocess

    command = [sys.executable, script, "--worker", side, "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--threads", str(args.threads), f"--layers={args.layers}", *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"error: the {side} worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])
