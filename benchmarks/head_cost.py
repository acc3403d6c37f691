"""Cost of the Bayesian last layer versus width d and classes C, for dense (full), low-rank and
diagonal Gaussian guides: O(C d²) for the dense factor vs O(C d r) and O(C d).

For each (d, C) it times, interleaved across guides, ``GaussianWeights.logit_moments`` (forward,
no grad) and the Jensen ELBO with its backward pass (``jensen_expected_loglik`` + ``kl_to_normal``,
gradients for μ, the factor and δ), with one weight row per class (the letters head, K = C) and
B = 8 examples. Scaling exponents are least-squares slopes of log time on log d (d >= 256, at the
largest C) and on log C (at d = 576 or the nearest). The targets are the exponents the algebra
predicts (dense >= 1.5 in d, low-rank and diagonal <= 1.3), not issue-8 numbers. No backbone.

    python benchmarks/head_cost.py                       # ~2 min; writes results/head_cost.json
    python benchmarks/head_cost.py --dims 64,256,1024 --classes 2,8 --out /tmp/head_cost.json   # quick
"""
from __future__ import annotations

import math

import torch

import _common as bench

GUIDES = ("full", "lowrank", "diagonal")


def weights(guide: str, classes: int, dim: int, rank: int, device) -> tuple[list, callable]:
    """Leaf parameters and a function building the GaussianWeights from them (as a guide does)."""
    from bayes_polar.bll.posterior import GaussianWeights

    g = torch.Generator().manual_seed(0)
    loc = (torch.randn(classes, dim, generator=g) * 0.01).to(device).requires_grad_()
    if guide == "full":
        raw = (torch.randn(classes, dim, dim, generator=g) * 0.01 / math.sqrt(dim)).to(device)
        raw = (raw + 0.1 * torch.eye(dim, device=device)).requires_grad_()
        return [loc, raw], lambda: GaussianWeights(loc, factor=raw.tril(), triangular=True)
    diag = torch.full((classes, dim), -4.0, device=device, requires_grad=True)
    if guide == "diagonal":
        return [loc, diag], lambda: GaussianWeights(loc, diag=diag.exp())
    factor = (torch.randn(classes, dim, rank, generator=g) * 0.01).to(device).requires_grad_()
    return [loc, factor, diag], lambda: GaussianWeights(loc, factor=factor, diag=diag.exp())


def sides_for(args, classes: int, dim: int) -> dict:
    from bayes_polar.bll.elbo import jensen_expected_loglik
    from bayes_polar.bll.posterior import kl_to_normal

    g = torch.Generator().manual_seed(1)
    phi = torch.randn(args.batch, classes, dim, generator=g).to(args.device)
    y = torch.randint(classes, (args.batch,), generator=g).to(args.device)
    prior_var = torch.tensor(2.0 / dim, device=args.device)
    sides = {}
    for guide in GUIDES:
        params, build = weights(guide, classes, dim, args.rank, args.device)

        def moments(i, build=build):
            with torch.no_grad():
                build().logit_moments(phi)

        def elbo(i, build=build, params=params):
            q = build()
            loss = -(jensen_expected_loglik(q, phi, y).sum() * 1000 / args.batch - kl_to_normal(q, 0.0 * prior_var, prior_var))
            torch.autograd.grad(loss, params)

        sides[f"{guide}/moments"], sides[f"{guide}/elbo"] = moments, elbo
    return sides


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv=None) -> None:
    parser = bench.base_parser(__doc__, repeats=5)
    parser.add_argument("--dims", default="64,128,256,576,1024,2048", help="widths d (default: %(default)s)")
    parser.add_argument("--classes", default="2,4,16", help="classes C (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="low-rank guide rank r (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="examples B (default: %(default)s)")
    args = parser.parse_args(argv)
    bench.setup(args)
    args.out = args.out or bench.RESULTS / "head_cost.json"  # no backbone: --model does not apply
    load = bench.load_now()
    dims = [int(x) for x in args.dims.split(",")]
    classes = [int(x) for x in args.classes.split(",")]
    table = {}  # "guide/kind" -> {"d=..,C=..": median seconds}
    measurements = {}
    for c in classes:
        for d in dims:
            samples = bench.interleaved(args, sides_for(args, c, d), args.repeats)
            for name, s in samples.items():
                measurements.setdefault(name, {})[f"d={d},C={c}"] = bench.timing(s)
                table.setdefault(name, {})[(d, c)] = bench.timing(s)["median_s"]
    big_c = max(classes)
    fit_dims = [d for d in dims if d >= 256] or dims
    ref_d = min(dims, key=lambda d: abs(d - 576))
    ratios = []
    for name, cells in table.items():
        guide = name.split("/")[0]
        d_exp = slope(fit_dims, [cells[(d, big_c)] for d in fit_dims])
        target, sense = (1.5, ">=") if guide == "full" else (1.3, "<=")
        entry = {"name": f"{name}: exponent of d", "value": round(d_exp, 2), "target": f"{sense} {target}",
                 "met": bool(d_exp >= target if sense == ">=" else d_exp <= target),
                 "note": f"slope of log time on log d over d={fit_dims}, C={big_c}"}
        ratios.append(entry)
        if len(classes) > 1:
            c_exp = slope(classes, [cells[(ref_d, c)] for c in classes])
            ratios.append({"name": f"{name}: exponent of C", "value": round(c_exp, 2), "target": None, "met": None,
                           "note": f"slope over C={classes} at d={ref_d}; ~1 once the work dominates overheads"})
    for kind in ("moments", "elbo"):
        ratios.append(bench.ratio(f"full_over_lowrank_{kind}_d{ref_d}_C{big_c}", table[f"full/{kind}"][(ref_d, big_c)],
                                  table[f"lowrank/{kind}"][(ref_d, big_c)]))
    settings = {"dims": dims, "classes": classes, "rank": args.rank, "batch": args.batch, "rows": "K = C (letters head)"}
    bench.write_result("head_cost", args, settings, measurements, ratios, load)


if __name__ == "__main__":
    main()
