"""VI vs NUTS: agreement where it must agree (full covariance), disagreement where it cannot (diagonal),
the projection and the projected prior; the posterior check and to_inference_data on a tiny run, and the CLI."""
import json

import pyro.distributions as dist
import pytest
import torch

from bayes_polar.errors import ConfigError
from bayes_polar.bll.model import FnPrior, head_logits
from bayes_polar.models import IsotropicPrior, StudentTPrior, WidthScaledPrior
from bayes_polar.evaluation.posterior_check import (ProjectedGaussianPrior, compare_vi_nuts, feature_projection,
                                         format_report, projected_prior)


def synthetic(n=80, seed=3):
    """Options-style problem with correlated features, so the posterior has strong correlations."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(1, 3, generator=g) * 2.0 / 3 ** 0.5
    phi = torch.randn(n, 3, 3, generator=g) @ torch.tensor([[1.0, 0.8, 0.0], [0.0, 0.6, 0.0], [0.3, 0.0, 1.0]])
    mask = torch.ones(n, 3, dtype=torch.bool)
    y = torch.multinomial(head_logits(W, phi, mask).softmax(-1), 1, generator=g).squeeze(-1)
    return phi, mask, y


@pytest.fixture(scope="module")
def comparisons():
    phi, mask, y = synthetic()
    settings = dict(eval_data=(phi[60:], mask[60:], y[60:]), num_samples=300, warmup=200, chains=2,
                    vi_steps=800, num_draws=2000)
    full = compare_vi_nuts(phi[:60], mask[:60], y[:60], IsotropicPrior(1.0), "full", **settings)
    diagonal = compare_vi_nuts(phi[:60], mask[:60], y[:60], IsotropicPrior(1.0), "diagonal", **settings)
    return full, diagonal


def test_full_covariance_vi_agrees_with_nuts(comparisons):
    report = comparisons[0].report
    assert report["nuts"]["max_r_hat"] < 1.03 and report["nuts"]["min_ess_bulk"] > 150, report["nuts"]
    assert report["nuts"]["divergences"] == 0
    assert report["moments"]["mean_gap_over_sd_max"] < 0.25, report["moments"]
    assert 0.85 < report["moments"]["sd_ratio_min"] and report["moments"]["sd_ratio_max"] < 1.15, report["moments"]
    assert report["predictive"]["mean_abs_diff"] < 0.01, report["predictive"]
    vi, nuts = report["predictive"]["vi"], report["predictive"]["nuts"]
    assert abs(vi["nll"] - nuts["nll"]) < 0.02 and vi["n"] == nuts["n"] == 20


def test_diagonal_vi_underestimates_the_spread(comparisons):
    """The check must be able to fail: a mean-field guide cannot carry the correlations, so its sd shrinks."""
    assert comparisons[1].report["moments"]["sd_ratio_min"] < 0.8, comparisons[1].report["moments"]


def test_comparison_inference_data(comparisons):
    full = comparisons[0]
    assert full.nuts.posterior["W"].shape == (2, 300, 1, 3)
    assert full.nuts.sample_stats["diverging"].dims == ("chain", "draw")
    assert full.vi.posterior["W"].shape == (2, 1000, 1, 3)  # iid draws in two chains
    assert full.vi.posterior_predictive["proba"].shape == (2, 1000, 20, 3)
    text = format_report(full.report)
    assert "max r_hat" in text and "W[class_0, phi_" in text and "sd_VI / sd_NUTS" in text and "mean |p_VI - p_NUTS|" in text


def test_projection_is_orthonormal_and_keeps_the_included_direction():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(50, 4, 20, generator=g) * torch.linspace(0.1, 3, 20)
    mask = torch.ones(50, 4, dtype=torch.bool)
    mean = torch.randn(1, 20, generator=g)
    projection = feature_projection(phi, mask, 5, include=mean)
    P = projection.basis
    assert P.shape == (20, 5)
    torch.testing.assert_close(P.T @ P, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(P @ (P.T @ mean[0]), mean[0], atol=1e-4, rtol=0)  # the mean lies in the span
    assert 0 < projection.explained_variance <= 1 and "20 -> 5 dims" in projection.description
    assert projection(phi).shape == (50, 4, 5)
    # only differences between options matter: adding a per-question offset leaves the basis alone
    shifted = feature_projection(phi + torch.randn(50, 1, 20, generator=g), mask, 5, include=mean)
    torch.testing.assert_close((shifted.basis.T @ P).abs().det().abs(), torch.tensor(1.0), atol=1e-3, rtol=0)
    identity = feature_projection(phi, mask, 20)
    assert identity.basis is None and identity(phi) is phi and "none" in identity.description
    with pytest.raises(ConfigError, match="dims >= 1"):
        feature_projection(phi, mask, 0)


def test_projected_prior_is_the_exact_pushforward():
    phi = torch.randn(30, 3, 12)
    projection = feature_projection(phi, torch.ones(30, 3, dtype=torch.bool), 4)
    P = projection.basis
    prior, text = projected_prior(WidthScaledPrior(gain=2.0), projection, 12, 1)
    assert isinstance(prior, ProjectedGaussianPrior) and "N(Pᵀμ, σ²I)" in text
    d = prior.distribution(4, 1)
    torch.testing.assert_close(d.variance, torch.full((1, 4), 2.0 / 12))
    scales = torch.linspace(0.5, 2.0, 12)
    ard_like = FnPrior(lambda dim, rows: dist.Normal(torch.ones(rows, dim), scales.expand(rows, dim)))
    prior, text = projected_prior(ard_like, projection, 12, 1)
    assert "PᵀΣP" in text
    d = prior.distribution(4, 1)
    torch.testing.assert_close(d.mean, torch.ones(1, 12) @ P)
    torch.testing.assert_close(d.base_dist.covariance_matrix[0], P.T @ torch.diag(scales ** 2) @ P)
    prior, text = projected_prior(StudentTPrior(), projection, 12, 1)
    assert isinstance(prior, StudentTPrior) and "not the run's prior" in text


def test_letters_features_need_a_mask():
    phi, _, y = synthetic(n=10)
    with pytest.raises(ConfigError, match="Pass mask"):
        compare_vi_nuts(phi[:, :1], None, y, IsotropicPrior(1.0))


@pytest.mark.integration
def test_posterior_check_and_inference_data_of_a_tiny_run(tmp_path, data_dir, capsys):
    from bayes_polar.cli import main
    from bayes_polar.config import FitConfig
    from bayes_polar.evaluation.inspection import load_inference_data, to_inference_data
    from bayes_polar.run import run_fit

    run = tmp_path / "run"
    config = FitConfig(model="tiny-random-llama", task="arc_easy", data_dir=str(data_dir), train_limit=16,
                       eval_limit=8, steps=6, batch_size=4, layers="-1", rank=4, alpha=8, threads=1,
                       checkpoint_every=0, max_length=96, eval_batch_size=8, predictive_samples=32, warmup_steps=2)
    run_fit(config, run, progress=False, log=lambda *_: None)

    idata = to_inference_data(run, num_draws=40, features=5)
    assert not list(run.glob("*.nc"))  # nothing written unless asked
    idata = to_inference_data(run, num_draws=40, features=5, save=True)
    assert idata.posterior["W"].shape == (2, 40, 1, 5) and list(idata.posterior["class"].values) == ["shared"]
    assert idata.posterior_predictive["proba"].dims == ("chain", "draw", "question", "choice")
    assert idata.observed_data["y"].shape == (8,) and idata.attrs["split"] == "validation"
    assert idata.sample_stats["elbo"].shape == (6,)
    assert idata.sample_stats["stable_rank"].dims == ("layer",) and idata.sample_stats["layer"].size == 2
    assert (idata.sample_stats["orthogonality_error_X"].values < 1e-5).all()
    assert load_inference_data(run / "posterior_arc_easy_validation.nc").posterior["W"].shape == (2, 40, 1, 5)
    train = to_inference_data(run, split="train", limit=10, num_draws=20, save=False)
    assert train.log_likelihood["y"].shape == (2, 20, 10)

    code = main(["posterior-check", str(run), "--limit", "16", "--eval-limit", "8", "--dims", "6",
                 "--num-samples", "60", "--warmup", "60", "--vi-steps", "200", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "34 -> 6 dims" in printed and "NUTS: 2 chain(s) x 60 draws" in printed and "run (all D)" in printed
    report = json.loads((run / "posterior_check.json").read_text())
    assert report["projection"]["dims"] == 6 and report["data"]["n"] == 16 and report["data"]["eval_n"] == 8
    assert {"vi", "nuts", "run"} <= set(report["predictive"])
    for name in report["files"].values():
        assert (run / name).stat().st_size > 0, name
    assert load_inference_data(run / "posterior_check_nuts.nc").posterior["W"].shape == (2, 60, 1, 6)


@pytest.mark.integration
def test_point_estimate_runs_have_no_posterior(tmp_path, data_dir):
    from bayes_polar.config import FitConfig
    from bayes_polar.evaluation.inspection import to_inference_data
    from bayes_polar.evaluation.posterior_check import posterior_check
    from bayes_polar.run import build_pipeline

    pipe = build_pipeline(FitConfig(model="tiny-random-llama", method="lora-mle", data_dir=str(data_dir),
                                    train_limit=4, layers="-1", rank=2, threads=1))
    with pytest.raises(ConfigError, match="point-estimate head"):
        to_inference_data(pipe)
    with pytest.raises(ConfigError, match="point-estimate head"):
        posterior_check(pipe)
