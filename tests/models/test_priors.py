"""The prior contract, checked over the PRIORS registry, plus user-written prior files."""
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from bayes_polar.errors import ConfigError, ShapeMismatchError
from bayes_polar.bll.model import BayesianLastLayer, FnPrior, Prior
from bayes_polar.models import PRIORS, ARDPrior, IsotropicPrior, LMHeadPrior, StudentTPrior, WidthScaledPrior
from bayes_polar.bll.registry import load_prior

ROWS, FEATURES = 3, 7
GAUSSIAN = {"isotropic", "width_scaled", "ard_empirical", "lm_head"}


def _build(name):
    prior = PRIORS[name]()
    prior.attach({"lm_head_rows": torch.randn(ROWS, FEATURES)})
    return prior


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_contract(name):
    prior = _build(name)
    assert isinstance(prior, Prior)
    with poutine.trace() as tracer:
        W = prior.sample(FEATURES, ROWS)
    assert W.shape == (ROWS, FEATURES)
    site = tracer.trace.nodes["head.W"]
    assert tuple(site["fn"].event_shape) == (ROWS, FEATURES) and tuple(site["fn"].batch_shape) == ()
    assert all(n.startswith("head.") for n, s in tracer.trace.nodes.items() if s["type"] in ("sample", "param"))
    if name in GAUSSIAN:
        loc, var = prior.gaussian_moments(FEATURES, ROWS)
        assert (var > 0).all() and loc.expand(ROWS, FEATURES).shape == (ROWS, FEATURES)
    else:
        with pytest.raises(ConfigError, match="elbo='mc'"):
            prior.gaussian_moments(FEATURES, ROWS)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_vectorised_particles_keep_W_aligned_with_the_data_plate(name):
    prior = _build(name)
    with pyro.plate("particles", 5, dim=-2):
        W = prior.sample(FEATURES, ROWS)
    assert W.shape == (5, 1, ROWS, FEATURES)


def test_moments_are_the_documented_ones():
    assert IsotropicPrior(2.0).gaussian_moments(4, 1)[1].unique().item() == pytest.approx(2.0)
    assert WidthScaledPrior(2.0).gaussian_moments(8, 1)[1].unique().item() == pytest.approx(0.25)
    rows = torch.randn(2, 4)
    loc, var = LMHeadPrior(0.5, mean=rows).gaussian_moments(4, 2)
    assert torch.equal(loc, rows) and var.unique().item() == pytest.approx(0.5)
    assert ARDPrior().hyper_sites(4, 2) == ["head.ard_scale"]
    assert ARDPrior(empirical=True).hyper_sites(4, 2) == []


@pytest.mark.parametrize("build,message", [
    (lambda: IsotropicPrior(-1.0), "Expected variance > 0 but got -1.0"),
    (lambda: WidthScaledPrior(0), "Expected gain > 0 but got 0"),
    (lambda: StudentTPrior(df=0), "Expected df > 0 but got 0"),
    (lambda: ARDPrior(global_scale=-2), "Expected global_scale > 0 but got -2"),
    (lambda: LMHeadPrior(variance=0), "Expected variance > 0 but got 0"),
])
def test_hyperparameters_are_validated(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_lm_head_prior_needs_rows_of_the_right_shape():
    with pytest.raises(ValueError, match="attach"):
        LMHeadPrior().weight_dist(4, 2)
    with pytest.raises(ValueError, match=r"needs \(3, 4\)"):
        LMHeadPrior(mean=torch.zeros(2, 4)).weight_dist(4, 3)


def test_wrong_shape_from_a_prior_is_reported():
    bad = FnPrior(lambda d, k: dist.Normal(torch.zeros(d), 1.0))
    with pytest.raises(ShapeMismatchError, match=r"must have shape \(\.\.\., 2, 4\)"):
        bad.sample(4, 2)


def test_fn_prior_escape_hatch_runs_in_the_model():
    head = BayesianLastLayer(4, 2, FnPrior(lambda d, k: dist.Laplace(torch.zeros(k, d), 0.1)))
    trace = poutine.trace(head).get_trace(torch.randn(3, 1, 4))
    assert isinstance(trace.nodes["head.W"]["fn"].base_dist, dist.Laplace)
    with pytest.raises(ConfigError):
        FnPrior(3.0)


def test_prior_by_name_and_unknown_name():
    assert isinstance(load_prior("student_t", df=5.0), StudentTPrior)
    assert load_prior("ard_empirical").empirical is True
    with pytest.raises(ConfigError, match="Unknown prior 'gaussian'"):
        load_prior("gaussian")


USER_PRIOR = '''
import pyro.distributions as dist
import torch

from bayes_polar.bll.model import Prior


class LaplacePrior(Prior):
    """Sparse-ish prior: W ~ Laplace(0, b)."""

    def __init__(self, scale=0.1):
        self.scale = scale

    def weight_dist(self, in_features, num_rows):
        return dist.Laplace(torch.zeros(num_rows, in_features), self.scale)
'''


def test_prior_from_a_user_file(tmp_path):
    path = tmp_path / "my_prior.py"
    path.write_text(USER_PRIOR)
    prior = load_prior(str(path), scale=0.3)
    assert type(prior).__name__ == "LaplacePrior" and prior.scale == 0.3
    head = BayesianLastLayer(4, 1, prior)
    trace = poutine.trace(head).get_trace(torch.randn(3, 2, 4))
    assert (trace.nodes["head.W"]["fn"].base_dist.scale == 0.3).all()


def test_prior_file_must_define_exactly_one_prior(tmp_path):
    path = tmp_path / "two.py"
    path.write_text(USER_PRIOR + textwrap.dedent('''
        class OtherPrior(LaplacePrior):
            pass
    '''))
    with pytest.raises(ConfigError, match=r"exactly one public Prior.*LaplacePrior.*OtherPrior"):
        load_prior(str(path))
    empty = tmp_path / "none.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="found none"):
        load_prior(str(empty))
