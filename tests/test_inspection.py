"""ArviZ conversion: InferenceData groups, dims and shapes; az.summary, az.plot_forest, az.loo headless; NetCDF."""
import arviz as az
import numpy as np
import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI

from bayes_polar.bll.elbo import make_elbo
from bayes_polar.errors import ConfigError, ShapeMismatchError
from bayes_polar.guides import GUIDES
from bayes_polar.bll.model import BayesianLastLayer
from bayes_polar.training.trainable_heads import VariationalHead
from bayes_polar.evaluation.inspection import (draw_logits, feature_names, from_weight_draws, load_inference_data,
                                    plot_forest, save_inference_data, summary, to_inference_data)
from bayes_polar.models import ARDPrior, IsotropicPrior
from bayes_polar.bll.posterior import weight_posterior
from bayes_polar.bll.registry import make_guide

B, C, D, S = 40, 4, 6, 200


def problem(rows=1, seed=0):
    """Options (rows=1: φ (B, C, D), some questions with 3 choices) or letters (rows=C: φ (B, 1, D))."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(B, C if rows == 1 else 1, D, generator=g)
    mask = torch.ones(B, C, dtype=torch.bool)
    mask[:5, -1] = False
    y = torch.randint(0, C - 1, (B,), generator=g)
    return phi, mask, y


def fitted(prior=None, guide="full", rows=1, estimator="jensen", steps=60):
    phi, mask, y = problem(rows)
    head = BayesianLastLayer(D, rows, prior or IsotropicPrior(1.0))
    guide = make_guide(guide, head)
    svi = SVI(head, guide, pyro.optim.Adam({"lr": 0.05}), make_elbo(estimator, 4))
    for _ in range(steps):
        svi.step(phi, mask, y, dataset_size=B)
    return head, guide, phi, mask, y


def test_groups_dims_and_shapes_options():
    head, guide, phi, mask, y = fitted()
    idata = to_inference_data(head, guide, phi, mask, y, num_draws=S)
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood", "observed_data",
                                   "constant_data"}
    W = idata.posterior["W"]
    assert W.dims == ("chain", "draw", "class", "feature") and W.shape == (2, S, 1, D)
    assert list(W["class"].values) == ["class_0"] and list(W["feature"].values) == feature_names(D)
    pp = idata.posterior_predictive
    assert pp["y"].dims == ("chain", "draw", "question") and pp["y"].shape == (2, S, B)
    assert pp["proba"].dims == ("chain", "draw", "question", "choice") and pp["proba"].shape == (2, S, B, C)
    np.testing.assert_allclose(pp["proba"].sum("choice"), 1.0, atol=1e-5)
    assert (pp["proba"].values[:, :, :5, -1] == 0).all() and (pp["y"].values[:, :, :5] < C - 1).all()
    assert list(pp["choice"].values) == list("ABCD")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "question")
    assert idata.observed_data["y"].shape == (B,) and (idata.observed_data["y"].values == y.numpy()).all()
    assert idata.constant_data["mask"].dims == ("question", "choice")
    # log p(y_t | W_s) is the per-draw probability of the observed label
    chosen = np.take_along_axis(pp["proba"].values, y.numpy()[None, None, :, None], -1)[..., 0]
    np.testing.assert_allclose(np.exp(idata.log_likelihood["y"].values), chosen, rtol=1e-4)


def test_weight_draws_match_the_guide():
    head, guide, phi, mask, y = fitted()
    idata = to_inference_data(head, guide, phi, mask, y, num_draws=4000)
    q = weight_posterior(guide)
    draws = torch.as_tensor(idata.posterior["W"].values).flatten(0, 1)  # (chains * S, 1, D)
    sd = q.variance().sqrt().detach()
    assert ((draws.mean(0) - q.loc.detach()).abs() / sd).max() < 0.1
    torch.testing.assert_close(draws.std(0), sd, rtol=0.1, atol=0)
    again = to_inference_data(head, guide, phi, mask, y, num_draws=4000)
    np.testing.assert_array_equal(again.posterior["W"].values, idata.posterior["W"].values)  # seeded


def test_letters_classes_and_shared_features():
    head, guide, phi, mask, y = fitted(rows=C)
    idata = to_inference_data(head, guide, phi, mask, y, num_draws=50, class_names=list("ABCD"))
    assert idata.posterior["W"].shape == (2, 50, C, D)
    assert list(idata.posterior["class"].values) == list("ABCD")
    assert idata.posterior_predictive["proba"].shape == (2, 50, B, C)


def test_summary_forest_and_loo_run_headless(tmp_path):
    head, guide, phi, mask, y = fitted()
    idata = to_inference_data(head, guide, phi, mask, y, num_draws=S)
    table = az.summary(idata, var_names=["W"], kind="stats")
    assert len(table) == D and {"mean", "sd"} <= set(table.columns)
    assert list(summary(idata).index) == list(table.index)
    path = plot_forest({"VI": idata}, tmp_path / "forest.png")
    assert path.stat().st_size > 1000
    from matplotlib.figure import Figure

    axes = az.plot_forest(idata, var_names=["W"], combined=True, ax=Figure().add_subplot())
    assert len(axes) == 1
    loo, waic = az.loo(idata), az.waic(idata)
    assert np.isfinite(loo.elpd_loo) and np.isfinite(waic.elpd_waic)
    assert loo.n_data_points == B
    lppd = np.log(np.exp(idata.log_likelihood["y"].values).mean((0, 1))).sum()
    assert loo.elpd_loo <= lppd + 1e-6  # leave-one-out never beats in-sample


def test_feature_selection_top_k_and_by_name():
    head, guide, phi, mask, y = fitted()
    loc = weight_posterior(guide).loc.detach()[0]
    idata = to_inference_data(head, guide, phi, mask, y, num_draws=S, features=2)
    top = sorted(torch.topk(loc.abs(), 2).indices.tolist())
    assert list(idata.posterior["feature"].values) == [f"phi_{i}" for i in top]
    assert idata.posterior_predictive["proba"].shape == (2, S, B, C)  # the predictive still uses all of W
    named = to_inference_data(head, guide, phi, mask, y, num_draws=10, features=["phi_5", 0])
    assert list(named.posterior["feature"].values) == ["phi_5", "phi_0"]
    with pytest.raises(ConfigError, match="Unknown feature 'nope'"):
        to_inference_data(head, guide, phi, mask, y, num_draws=10, features=["nope"])
    with pytest.raises(ConfigError, match="1 <= features <= 6"):
        to_inference_data(head, guide, phi, mask, y, num_draws=10, features=0)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_every_guide_converts(name):
    head, guide, phi, mask, y = fitted(guide=name, steps=3)
    idata = to_inference_data(head, guide, phi, mask, y, num_draws=20)
    assert idata.posterior["W"].shape == (2, 20, 1, D)


def test_hyperparameters_join_the_posterior_without_auxiliary_sites():
    head, guide, phi, mask, y = fitted(prior=ARDPrior(), estimator="mc", steps=5)
    idata = to_inference_data(head, guide, phi, mask, y, num_draws=30)
    assert set(idata.posterior.data_vars) == {"W", "ard_scale"}
    assert idata.posterior["ard_scale"].shape == (2, 30, D)
    assert (idata.posterior["ard_scale"].values > 0).all()


def test_variational_head_and_gaussian_weights_sources():
    phi, mask, y = problem()
    head = VariationalHead(D, 1, IsotropicPrior(1.0), "diagonal", dataset_size=B)
    from bayes_polar.data.features import Features

    features = Features(phi, mask)
    head.setup(features, y)
    for _ in range(5):
        head.guide_step(features, y)
    from_head = to_inference_data(head, phi=features, labels=y, num_draws=25)
    from_weights = to_inference_data(head.posterior(), phi=phi, mask=mask, labels=y, num_draws=25)
    assert from_head.posterior["W"].shape == from_weights.posterior["W"].shape == (2, 25, 1, D)
    posterior_only = to_inference_data(head.posterior(), num_draws=5)
    assert set(posterior_only.groups()) == {"posterior"}


def test_netcdf_round_trip(tmp_path):
    head, guide, phi, mask, y = fitted()
    idata = from_weight_draws(torch.randn(2, 30, 1, D), phi, mask, y, attrs={"task": "synthetic", "n": 3},
                              sample_stats={"elbo": (np.arange(5.0), ("step",)),
                                            "stable_rank": ({"layer.a": 1.5, "layer.b": 2.5}, ("layer",))})
    path = save_inference_data(idata, tmp_path / "sub" / "posterior.nc")
    back = load_inference_data(path)
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        for name, value in idata[group].data_vars.items():
            np.testing.assert_array_equal(back[group][name].values, value.values)
    assert back.posterior.attrs["task"] == "synthetic" and back.attrs["n"] == 3
    assert list(back.sample_stats["layer"].values) == ["layer.a", "layer.b"]
    assert summary(back).shape[0] == D and "r_hat" in summary(back).columns  # two chains: diagnostics
    with pytest.raises(FileNotFoundError, match="to_inference_data"):
        load_inference_data(tmp_path / "missing.nc")


def test_errors_say_what_to_do():
    head, guide, phi, mask, y = fitted()
    with pytest.raises(ConfigError, match="needs the head's guide"):
        to_inference_data(head, phi=phi, mask=mask, labels=y)
    with pytest.raises(ConfigError, match="RUN_DIR, a Pipeline"):
        to_inference_data(42)
    with pytest.raises(ShapeMismatchError, match="weight draws"):
        from_weight_draws(torch.randn(D))
    with pytest.raises(ShapeMismatchError, match="labels of shape"):
        from_weight_draws(torch.randn(3, 1, D), phi, mask, y[:3])


def test_draw_logits_matches_head_logits():
    from bayes_polar.bll.model import head_logits

    phi, mask, _ = problem()
    weights = torch.randn(7, 1, D)
    torch.testing.assert_close(draw_logits(weights, phi, mask), head_logits(weights.unsqueeze(1), phi, mask))
    letters_phi = phi[:, :1]
    weights = torch.randn(7, C, D)
    torch.testing.assert_close(draw_logits(weights, letters_phi), head_logits(weights.unsqueeze(1), letters_phi))


def _trained_head(prior, seed, steps=40):
    """A VariationalHead fitted on its own problem; its guide lives in the head's parameter store."""
    from bayes_polar.data.features import Features

    phi, mask, y = problem(seed=seed)
    y = (y + seed) % (C - 1)
    head = VariationalHead(D, 1, prior, "full", dataset_size=B, lr=0.05)
    features = Features(phi, mask)
    head.setup(features, y)
    for _ in range(steps):
        head.guide_step(features, y)
    return head, features, y


def test_two_heads_in_one_process_each_inference_data_matches_its_own_guide():
    """Regression: the inspection path read the guide outside the head's store and returned the first
    posterior it saw for every later head in the process."""
    heads = [_trained_head(IsotropicPrior(1.0), seed=0), _trained_head(IsotropicPrior(0.05), seed=1)]
    idatas = [to_inference_data(head, phi=features, labels=y, num_draws=2000) for head, features, y in heads]
    for (head, _, _), idata in zip(heads, idatas):
        q = head.posterior()
        draws = torch.as_tensor(idata.posterior["W"].values).flatten(0, 1)  # (chains * draws, 1, D)
        sd = q.variance().sqrt().detach()
        assert ((draws.mean(0) - q.loc.detach()).abs() / sd).max() < 0.15
        torch.testing.assert_close(draws.std(0), sd, rtol=0.15, atol=0)
    first, second = (torch.as_tensor(i.posterior["W"].values) for i in idatas)
    assert (first.mean((0, 1)) - second.mean((0, 1))).abs().max() > 3 * first.std((0, 1)).max()  # distinct posteriors


def test_default_draws_are_two_chains_and_az_summary_is_quiet(recwarn):
    head, guide, phi, mask, y = fitted()
    idata = to_inference_data(head, guide, phi, mask, y, num_draws=S)
    assert idata.posterior.sizes["chain"] == 2 and idata.attrs["chains"] == 2
    table = az.summary(idata, var_names=["W"])  # ArviZ's defaults: kind="all", r_hat and ESS
    assert not [w for w in recwarn if "Shape validation" in str(w.message)]
    assert np.isfinite(table["r_hat"]).all() and (table["r_hat"] < 1.05).all()  # iid draws: r_hat ≈ 1
    assert (table["ess_bulk"] > 0.5 * 2 * S).all()
    one = to_inference_data(head, guide, phi, mask, y, num_draws=S, chains=1)
    assert one.posterior["W"].shape == (1, S, 1, D)


def test_nothing_is_written_unless_asked(tmp_path, monkeypatch):
    head, guide, phi, mask, y = fitted()
    monkeypatch.chdir(tmp_path)
    to_inference_data(head, guide, phi, mask, y, num_draws=10)
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "q.nc"
    idata = to_inference_data(head, guide, phi, mask, y, num_draws=10, save=path)
    np.testing.assert_array_equal(load_inference_data(path).posterior["W"].values, idata.posterior["W"].values)
    with pytest.raises(ConfigError, match="save=PATH"):
        to_inference_data(head, guide, phi, mask, y, num_draws=10, save=True)
