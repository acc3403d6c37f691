"""Optimiser step time: Riemannian Adam and landing on PoLAR factors / Adam on LoRA factors.

PoLAR (X, Y on ``EuclideanStiefel``, Θ) and peft LoRA (A, B) adapt the same modules at the same
rank; gradients are fixed random tensors, restored before every step and left out of the timing,
so only ``optimizer.step()`` is timed. Sides:

- ``polar_riemannian_adam``: ``make_adapter_optimizer(model, "riemannian_adam")`` (QR retraction);
- ``polar_landing``: ``make_adapter_optimizer(model, "landing")`` (no retraction);
- ``lora_adam``: ``torch.optim.Adam`` on A, B (the reference);
- ``lora_library``: what ``lora-mle`` uses, ``make_adapter_optimizer(model, "riemannian_adam")``
  (geoopt's Adam for Euclidean parameters).

Two scopes are measured: ``--layers`` (default: the demo's top blocks) and every block.
Issue 8 sets no target for these ratios; they explain the train-step ratio.

    python benchmarks/optimizer_step.py
    python benchmarks/optimizer_step.py --model smollm2-135m --repeats 30
"""
from __future__ import annotations

import time

import torch

import _common as bench


def _optimizers(args, layers: str) -> dict:
    """name -> (optimizer, [(param, fixed grad)]) on fresh PoLAR and LoRA adapters."""
    from bayes_polar.adapters import inject_lora, inject_polar, make_adapter_optimizer

    config = bench.fit_config(args, layers=layers)
    kwargs = dict(target_modules=config.target_module_names, rank=config.rank, alpha=config.alpha,
                  layers=config.layer_indices)
    polar, _ = bench.load_model(args)
    lora, _ = bench.load_model(args)
    torch.manual_seed(0)
    inject_polar(polar, **kwargs)
    inject_lora(lora, **kwargs)
    built = {"polar_riemannian_adam": (polar, make_adapter_optimizer(polar, "riemannian_adam", lr=1e-3)),
             "polar_landing": (polar, make_adapter_optimizer(polar, "landing", lr=1e-3)),
             "lora_adam": (lora, torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=1e-3)),
             "lora_library": (lora, make_adapter_optimizer(lora, "riemannian_adam", lr=1e-3))}
    out = {}
    for name, (model, optimizer) in built.items():
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [torch.randn_like(p) * 1e-2 for p in params]
        out[name] = (optimizer, list(zip(params, grads)))
    return out


def _step(args, optimizer, pairs):
    def side(i: int) -> float:
        for p, g in pairs:
            p.grad = g.clone()
        bench.synchronize(args)
        start = time.perf_counter()
        optimizer.step()
        bench.synchronize(args)
        return time.perf_counter() - start
    return side


def main(argv=None) -> None:
    parser = bench.base_parser(__doc__, repeats=30)
    args = parser.parse_args(argv)
    bench.setup(args)
    load = bench.load_now()
    measurements, ratios, settings = {}, [], {"scopes": {}}
    for scope, layers in (("demo_layers", args.layers), ("all_layers", "all")):
        optimizers = _optimizers(args, layers)
        sides = {name: _step(args, opt, pairs) for name, (opt, pairs) in optimizers.items()}
        samples = bench.interleaved(args, sides, args.repeats, warmup=2)
        measurements[scope] = {name: bench.timing(s) for name, s in samples.items()}
        settings["scopes"][scope] = {"layers": layers, "parameters": {
            name: sum(p.numel() for p, _ in pairs) for name, (_, pairs) in optimizers.items()}}
        ratios += [bench.paired_ratio(f"{name}_over_lora_adam_{scope}", samples[name], samples["lora_adam"])
                   for name in ("polar_riemannian_adam", "polar_landing", "lora_library")]
    settings.update(rank=8, target_modules="q_proj,v_proj", lr=1e-3)
    bench.write_result("optimizer_step", args, settings, measurements, ratios, load)


if __name__ == "__main__":
    main()
