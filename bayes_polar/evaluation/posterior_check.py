"""A NUTS reference for the variational last layer: how close is q(W) to the posterior it approximates?

With the features φ of the training questions fixed, the last layer is a small Bayesian
multinomial regression, and NUTS samples its exact posterior. D (≈ 578) is too many dimensions
for NUTS on a CPU, so both NUTS and a matching VI guide run on a projection

.. math:: \\tilde\\phi = P^\\top \\phi, \\qquad P \\in \\mathbb R^{D \\times k},\\ P^\\top P = I_k,

whose columns span the run's posterior mean rows and then the top principal directions of the
training features (within each question for the shared ``options`` row, where only differences
between options change the softmax). A Gaussian prior is pushed forward exactly:
:math:`\\tilde w_k \\sim \\mathcal N(P^\\top \\mu_k, P^\\top \\Sigma_k P)`. The VI guide is the run's
guide family fitted with the Monte Carlo (exact) ELBO, so what differs from NUTS is the
variational family alone. The comparison: ``az.summary`` (r_hat, ESS) of the NUTS chains, a forest
plot of both, standardised mean differences and sd ratios, and the predictive agreement on an
evaluation split (mean |p_VI − p_NUTS|; accuracy, ECE, NLL of each and of the run itself).

Usage::

    check = posterior_check("runs/arc", dims=32, num_samples=500, warmup=500)   # writes posterior_check.*
    check.report["moments"], check.nuts, check.vi                               # dict, InferenceData x 2
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from ..errors import ConfigError
from .metrics import classification_metrics
from ..data.normalization import centre_options
from ..bll.model import BayesianLastLayer, Prior
from .inspection import DEFAULT_CHAINS, from_weight_draws, guide_draws, plot_forest, save_inference_data, split_chains, summary
from ..bll.posterior import WEIGHT_SITE, weight_posterior

FILES = {"report": "posterior_check.json", "forest": "posterior_check_forest.png",
         "nuts": "posterior_check_nuts.nc", "vi": "posterior_check_vi.nc"}


@dataclass
class Projection:
    """φ ↦ φ P with orthonormal ``basis`` P (D, k); None is the identity (no projection)."""

    basis: torch.Tensor | None
    description: str
    explained_variance: float = 1.0

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        return phi if self.basis is None else phi @ self.basis


def _centred_rows(phi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows whose principal directions matter: options centred within each question, letters across questions."""
    if phi.shape[1] == 1:
        rows = phi[:, 0]
        return rows - rows.mean(0)
    return centre_options(phi, mask)[mask.bool()]


def feature_projection(phi, mask, dims: int, include: torch.Tensor | None = None) -> Projection:
    """The projection of the check: ``include`` rows (e.g. the posterior mean, (K, D)) first, then PCs.

    Returns the identity when ``dims >= D``.
    """
    in_features = phi.shape[-1]
    if dims < 1:
        raise ConfigError(f"Expected dims >= 1 but got {dims}")
    if dims >= in_features:
        return Projection(None, f"none: NUTS on all {in_features} features")
    rows = _centred_rows(phi.double(), mask)
    pcs = torch.linalg.svd(rows, full_matrices=False).Vh[:dims].T  # (D, dims)
    kept = [] if include is None else [v for v in include.double() if v.norm() > 1e-8][:dims]
    basis = torch.linalg.qr(torch.cat([torch.stack(kept, 1), pcs], 1) if kept else pcs).Q[:, :dims]
    explained = float((rows @ basis).pow(2).sum() / rows.pow(2).sum().clamp(min=1e-30))
    what = f"span of the run's posterior mean ({len(kept)} row(s)) + " if kept else ""
    centring = "within each question" if phi.shape[1] > 1 else "across questions"
    return Projection(basis.float(), f"{in_features} -> {dims} dims: {what}top principal directions of the "
                      f"training features (centred {centring}); {100 * explained:.1f}% of their variance",
                      explained)


class ProjectedGaussianPrior(Prior):
    """The pushforward of a diagonal Gaussian prior through P: per row N(loc_k, cov_k) or N(loc_k, scale_k²I)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor | None = None, covariance: torch.Tensor | None = None):
        self.loc, self.scale, self.covariance = loc, scale, covariance

    def __repr__(self) -> str:
        kind = "isotropic" if self.scale is not None else "full covariance"
        return f"ProjectedGaussianPrior({tuple(self.loc.shape)}, {kind})"

    def weight_dist(self, in_features, num_rows):
        if self.scale is not None:
            return dist.Normal(self.loc, self.scale)
        return dist.MultivariateNormal(self.loc, covariance_matrix=self.covariance)


def projected_prior(prior: Prior, projection: Projection, in_features: int, num_rows: int) -> tuple[Prior, str]:
    """The prior of the projected problem and a sentence that says what it is."""
    if projection.basis is None:
        return prior, f"the run's {prior!r}"
    basis = projection.basis
    try:
        mean, var = prior.gaussian_moments(in_features, num_rows)
    except ConfigError:
        return prior, (f"{prior!r} put directly on the {basis.shape[1]} projected coordinates (not a fixed "
                       "Gaussian: no closed-form pushforward, so not the run's prior)")
    mean = torch.as_tensor(mean, dtype=torch.float32).expand(num_rows, in_features).detach()
    var = torch.as_tensor(var, dtype=torch.float32).expand(num_rows, in_features).detach()
    loc = mean @ basis
    if torch.allclose(var, var[:, :1].expand_as(var)):
        scale = var[:, :1].sqrt().expand_as(loc).clone()
        return ProjectedGaussianPrior(loc, scale=scale), f"exact pushforward N(Pᵀμ, σ²I) of {prior!r}"
    covariance = torch.einsum("dj,kd,di->kji", basis, var, basis)
    return ProjectedGaussianPrior(loc, covariance=covariance), f"exact pushforward N(Pᵀμ, PᵀΣP) of {prior!r}"


# ----------------------------------------------------------------------------- NUTS and VI on fixed features
def run_nuts(model, args, num_samples: int = 500, warmup: int = 500, chains: int = 2, seed: int = 0):
    """Pyro NUTS chains, one after the other (no worker processes): ``(draws, divergent)``.

    ``draws`` maps each latent site to (chains, num_samples, ...); ``divergent`` is (chains, num_samples).
    Each chain starts from a prior draw, so r_hat compares dispersed starts.
    """
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide.initialization import init_to_sample

    if min(num_samples, chains) < 1 or warmup < 0:
        raise ConfigError(f"Expected num_samples >= 1, chains >= 1, warmup >= 0 but got {num_samples}, {chains}, {warmup}")
    runs, divergent = [], torch.zeros(chains, num_samples, dtype=torch.bool)
    for chain in range(chains):
        with torch.random.fork_rng():
            torch.manual_seed(seed + chain)
            mcmc = MCMC(NUTS(model, jit_compile=False, init_strategy=init_to_sample), num_samples=num_samples,
                        warmup_steps=warmup, num_chains=1, disable_progbar=True)
            mcmc.run(*args)
        runs.append(mcmc.get_samples())
        divergent[chain, mcmc.diagnostics()["divergences"]["chain 0"]] = True
    draws = {name: torch.stack([r[name] for r in runs]) for name in runs[0]}
    return draws, divergent


def fit_vi(model, guide, args, steps: int = 2000, lr: float = 0.05, elbo: str = "mc", num_particles: int = 8,
           seed: int = 0) -> float:
    """SVI on full-batch fixed features, learning rate decayed 10x over ``steps``; returns the final ELBO per example."""
    from pyro.infer import SVI

    from ..bll.elbo import make_elbo

    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)}),
              make_elbo(elbo, num_particles))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        losses = [svi.step(*args) for _ in range(steps)]
    tail = losses[-max(1, steps // 20):]
    return -sum(tail) / len(tail) / len(args[2])


@dataclass
class Comparison:
    """The VI and NUTS posteriors (InferenceData, with predictive on the evaluation questions) and the report."""

    vi: object
    nuts: object
    report: dict


def compare_vi_nuts(phi, mask, labels, prior: Prior, guide="full", *, eval_data=None, num_samples: int = 500,
                    warmup: int = 500, chains: int = 2, vi_steps: int = 2000, vi_lr: float = 0.05, elbo: str = "mc",
                    num_particles: int = 8, guide_kwargs: dict | None = None, num_draws: int = 1000,
                    class_names=None, feature_names=None, seed: int = 0) -> Comparison:
    """NUTS and a VI guide on the same last layer with fixed features; compare them.

    Parameters
    ----------
    phi, mask, labels : torch.Tensor
        Training features (N, C|1, D), choice mask (N, C), labels (N,); D of a few dozen at most.
    prior : Prior
        The prior over W (K × D); K is 1 for features (N, C, D), C for (N, 1, D).
    guide : str or callable
        A guide name, file or builder (as ``bayes-polar fit --guide``), fitted with ``elbo``.
    eval_data : tuple, optional
        ``(phi, mask, labels)`` of the questions the predictive is compared on (default: training).
    num_samples, warmup, chains : int
        NUTS draws per chain, warm-up steps, chains.
    vi_steps, vi_lr, elbo, num_particles : VI settings; ``elbo="mc"`` is the exact ELBO.

    Returns
    -------
    Comparison
    """
    from ..bll.registry import load_guide, make_guide

    if mask is None and phi.shape[1] == 1:
        raise ConfigError("Pass mask (N, C): with shared features (N, 1, D) the class count comes from the mask")
    mask = torch.ones(phi.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    rows = 1 if phi.shape[1] > 1 else mask.shape[1]
    head = BayesianLastLayer(phi.shape[-1], rows, prior)
    args = (phi, mask, labels)
    started = time.time()
    nuts_draws, divergent = run_nuts(head, args, num_samples, warmup, chains, seed)
    nuts_seconds = time.time() - started
    started = time.time()
    with pyro.get_param_store().scope():  # leave the caller's parameters (e.g. a loaded run) alone
        vi_guide = make_guide(load_guide(guide, **(guide_kwargs or {})), head)
        final_elbo = fit_vi(head, vi_guide, args, vi_steps, vi_lr, elbo, num_particles, seed)
        vi_draws = guide_draws(vi_guide, phi, mask, num_draws, seed)
        vi_mean, vi_sd = _vi_moments(vi_guide, vi_draws[WEIGHT_SITE])
    vi_seconds = time.time() - started
    eval_phi, eval_mask, eval_labels = eval_data if eval_data is not None else args
    names = dict(class_names=class_names, feature_names=feature_names, seed=seed)
    nuts_weights = nuts_draws.pop(WEIGHT_SITE).reshape(chains, num_samples, *vi_mean.shape)
    nuts = from_weight_draws(nuts_weights, eval_phi, eval_mask, eval_labels, extra=nuts_draws,
                             sample_stats={"diverging": (divergent.numpy(), ("chain", "draw"))},
                             attrs={"inference": "NUTS"}, **names)
    vi_draws = split_chains(vi_draws, DEFAULT_CHAINS if num_draws % DEFAULT_CHAINS == 0 else 1)  # iid: r_hat ≈ 1
    vi = from_weight_draws(vi_draws.pop(WEIGHT_SITE), eval_phi, eval_mask, eval_labels, extra=vi_draws,
                           attrs={"inference": "VI"}, **names)
    report = _report(nuts, vi, nuts_weights, vi_mean, vi_sd, eval_mask, eval_labels)
    report["nuts"].update(chains=chains, num_samples=num_samples, warmup=warmup, seconds=round(nuts_seconds, 1),
                          divergences=int(divergent.sum()))
    report["vi"] = {"guide": guide if isinstance(guide, str) else getattr(guide, "__name__", repr(guide)),
                    "elbo": elbo, "steps": vi_steps, "final_elbo_per_example": final_elbo, "seconds": round(vi_seconds, 1)}
    report["data"] = {"n": int(labels.shape[0]), "eval_n": int(eval_labels.shape[0]), "dims": int(phi.shape[-1])}
    return Comparison(vi, nuts, report)


def _vi_moments(guide, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        q = weight_posterior(guide)
        return q.loc.detach(), q.variance().detach().sqrt()
    except ConfigError:  # not Gaussian in closed form: moments of the draws
        return weights.mean(0), weights.std(0)


def _report(nuts, vi, nuts_weights, vi_mean, vi_sd, mask, labels) -> dict:
    flat = nuts_weights.reshape(-1, *nuts_weights.shape[2:])
    nuts_mean, nuts_sd = flat.mean(0), flat.std(0)
    gap = (vi_mean - nuts_mean).abs() / nuts_sd
    ratio = vi_sd / nuts_sd
    table = summary(nuts, round_to="none")
    p_nuts, p_vi = (torch.as_tensor(x.posterior_predictive["proba"].mean(("chain", "draw")).values) for x in (nuts, vi))
    diff = (p_vi - p_nuts).abs()
    keep = torch.ones_like(diff, dtype=torch.bool) if mask is None else mask.bool()  # the choices that exist
    return {
        "nuts": {"max_r_hat": float(table["r_hat"].max()), "min_ess_bulk": float(table["ess_bulk"].min()),
                 "min_ess_tail": float(table["ess_tail"].min()),
                 "summary": table[["mean", "sd", "ess_bulk", "ess_tail", "r_hat"]].to_dict(orient="index")},
        "moments": {"mean_gap_over_sd_mean": float(gap.mean()), "mean_gap_over_sd_max": float(gap.max()),
                    "sd_ratio_median": float(ratio.median()), "sd_ratio_min": float(ratio.min()),
                    "sd_ratio_max": float(ratio.max())},
        "predictive": {"mean_abs_diff": float(diff[keep].mean()),
                       "max_total_variation": float(0.5 * diff.sum(-1).max()),
                       "vi": classification_metrics(p_vi, labels), "nuts": classification_metrics(p_nuts, labels)},
    }


# ----------------------------------------------------------------------------- a fitted run
def posterior_check(source, *, run_dir=None, task: str | None = None, split: str = "train", limit: int | None = 256,
                    eval_split: str | None = None, eval_limit: int | None = 256, dims: int = 32,
                    num_samples: int = 500, warmup: int = 500, chains: int = 2, vi_steps: int = 2000,
                    elbo: str = "mc", forest_features: int = 12, data_dir=None, seed: int = 0, save: bool = True,
                    progress: bool = False, log=print, device: str | None = None,
                    dtype: str | None = None) -> Comparison:
    """VI vs NUTS for a fitted run, on its training features projected to ``dims`` dimensions.

    Parameters
    ----------
    source : str, Path or Pipeline
        A RUN_DIR or a pipeline from :func:`~bayes_polar.run.load_run` (then ``run_dir`` says
        where the files go; without it nothing is written).
    task, split, limit : the questions NUTS and VI condition on (default: the first 256 training questions).
    eval_split, eval_limit : the questions of the predictive comparison (default: the task's evaluation split).
    dims : int
        k, the projected dimension (no projection when D <= k).
    num_samples, warmup, chains, vi_steps, elbo : see :func:`compare_vi_nuts`.
    forest_features : int
        Coordinates in the forest plot (largest |NUTS mean|).
    device, dtype : where and in which precision a RUN_DIR's backbone runs (default: the run's).

    Returns
    -------
    Comparison
        ``report`` is also written to ``posterior_check.json`` with a forest plot
        (``posterior_check_forest.png``) and both posteriors as NetCDF; it is printed with ``log``.
    """
    from ..training.trainable_heads import VariationalHead
    from .inspection import feature_names
    from ..run import Pipeline, default_split, load_run, split_features

    if not isinstance(source, Pipeline):
        run_dir, source = Path(source), load_run(source, data_dir, device=device, dtype=dtype)
    pipe, config = source, source.config
    if not isinstance(pipe.method.head, VariationalHead):
        raise ConfigError(f"The run's method {config.method!r} has a point-estimate head: the posterior check "
                          "needs a variational method (polar-vbll, polar-vbll-la, lora-vbll)")
    task = task or config.task
    eval_split = eval_split or default_split(task)
    train, labels, _ = split_features(pipe, task, split, data_dir, limit, progress)
    held, held_labels, _ = split_features(pipe, task, eval_split, data_dir, eval_limit, progress)
    model, head = pipe.method.head.model, pipe.method.head
    posterior = pipe.method.laplace if pipe.method.laplace is not None else _gaussian(head)
    projection = feature_projection(train.phi, train.mask, dims, None if posterior is None else posterior.loc.detach())
    prior, prior_text = projected_prior(model.prior, projection, model.in_features, model.num_rows)
    letters = config.format == "letters"
    names = (feature_names(model.in_features, config.loglik_features and not letters) if projection.basis is None
             else [f"proj_{i}" for i in range(dims)])
    classes = list(pipe.train.task.answer_words) if letters else ["shared"]
    comparison = compare_vi_nuts(
        projection(train.phi), train.mask, labels, prior, config.guide, guide_kwargs=config.guide_kwargs,
        eval_data=(projection(held.phi), held.mask, held_labels), num_samples=num_samples, warmup=warmup,
        chains=chains, vi_steps=vi_steps, elbo=elbo, class_names=classes, feature_names=names, seed=seed)
    with torch.no_grad():
        run_probs = pipe.method.predict_proba(None, config.predictive_samples, held)
    report = comparison.report
    report["predictive"]["run"] = classification_metrics(run_probs, held_labels)
    report["run"] = {"method": config.method, "format": config.format, "prior": config.prior, "guide": config.guide,
                     "elbo": config.elbo, "in_features": model.in_features}
    report["data"].update(task=task, split=split, eval_split=eval_split)
    report["projection"] = {"dims": dims if projection.basis is not None else model.in_features,
                            "description": projection.description,
                            "explained_variance": projection.explained_variance}
    report["prior"] = prior_text
    if run_dir is not None and save:
        report["files"] = _write(comparison, Path(run_dir), forest_features)
    log(format_report(report))
    return comparison


def _gaussian(head):
    try:
        return head.posterior()
    except ConfigError:
        return None


def _write(comparison: Comparison, run_dir: Path, forest_features: int) -> dict:
    score = abs(comparison.nuts.posterior["W"].mean(("chain", "draw"))).max("class")
    top = set(score.sortby(score, ascending=False)["feature"].values[:forest_features].tolist())
    picked = [name for name in score["feature"].values.tolist() if name in top]
    plot_forest({"VI": comparison.vi, "NUTS": comparison.nuts}, run_dir / FILES["forest"],
                coords={"feature": picked}, title=f"W: VI vs NUTS ({len(picked)} largest |mean|)")
    save_inference_data(comparison.nuts, run_dir / FILES["nuts"])
    save_inference_data(comparison.vi, run_dir / FILES["vi"])
    files = {key: name for key, name in FILES.items()}
    (run_dir / FILES["report"]).write_text(json.dumps({**comparison.report, "files": files}, indent=2))
    return files


def format_report(report: dict) -> str:
    """The report as a few lines of text (what ``bayes-polar posterior-check`` prints)."""
    data, nuts, vi, moments, pred = (report[k] for k in ("data", "nuts", "vi", "moments", "predictive"))
    where = f"{data['task']}/{data['split']}" if "task" in data else "fixed features"
    held = f"{data['task']}/{data['eval_split']}" if "task" in data else "the evaluation questions"
    lines = [f"posterior check of {report.get('run', {}).get('method', 'the last layer')}: NUTS and VI on {where} "
             f"(n={data['n']}, {data['dims']} dims), predictive on {held} (n={data['eval_n']})"]
    if "projection" in report:
        lines += [f"projection: {report['projection']['description']}", f"prior: {report['prior']}"]
    lines.append(f"NUTS: {nuts['chains']} chain(s) x {nuts['num_samples']} draws ({nuts['warmup']} warm-up), "
                 f"{nuts['seconds']} s; max r_hat {nuts['max_r_hat']:.3f}, min ESS bulk {nuts['min_ess_bulk']:.0f} / "
                 f"tail {nuts['min_ess_tail']:.0f}, {nuts['divergences']} divergences")
    if not (nuts["max_r_hat"] < 1.01 and nuts["min_ess_bulk"] > 100 and nuts["divergences"] == 0):
        lines.append("  NUTS has not converged (want r_hat < 1.01, ESS > 100, no divergences): raise "
                     "--num-samples / --warmup before reading the comparison")
    worst = sorted(nuts["summary"].items(), key=lambda item: -item[1]["r_hat"])[:3]
    lines += [f"  {name:28s} mean {row['mean']:8.4f}  sd {row['sd']:.4f}  ESS {row['ess_bulk']:6.0f}  r_hat {row['r_hat']:.3f}"
              for name, row in worst]
    lines.append(f"VI:   {vi['guide']} guide, {vi['elbo']} ELBO, {vi['steps']} steps, {vi['seconds']} s; "
                 f"ELBO/example {vi['final_elbo_per_example']:.4f}")
    lines.append(f"|mean_VI - mean_NUTS| / sd_NUTS: mean {moments['mean_gap_over_sd_mean']:.3f}, max "
                 f"{moments['mean_gap_over_sd_max']:.3f};  sd_VI / sd_NUTS: median {moments['sd_ratio_median']:.3f} "
                 f"({moments['sd_ratio_min']:.3f}-{moments['sd_ratio_max']:.3f})")
    lines.append(f"predictive: mean |p_VI - p_NUTS| {pred['mean_abs_diff']:.4f}, max total variation "
                 f"{pred['max_total_variation']:.4f}")
    lines.append(f"  {'':14s} {'ACC':>6s} {'ECE%':>6s} {'NLL':>6s} {'Brier':>6s}")
    for name in ("vi", "nuts", "run"):
        if name in pred:
            r = pred[name]
            label = {"vi": "VI", "nuts": "NUTS", "run": "run (all D)"}[name]
            lines.append(f"  {label:14s} {r['acc']:6.3f} {r['ece']:6.2f} {r['nll']:6.3f} {r['brier']:6.3f}")
    if "files" in report:
        lines.append("files: " + ", ".join(report["files"].values()))
    return "\n".join(lines)
