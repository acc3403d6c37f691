"""Baselines' building blocks: temperature scaling, Laplace evidence, guide clipping, ensemble seeds, MAP decay."""
import math

import pyro
import pytest
import torch

from bayes_polar.bll.laplace import fit_laplace, ggn_blocks, laplace_evidence
from bayes_polar.bll.model import head_logits
from bayes_polar.bll.registry import load_prior
from bayes_polar.config import FitConfig
from bayes_polar.data.features import Features
from bayes_polar.run import _member_config
from bayes_polar.training.methods import optimal_temperature
from bayes_polar.training.trainable_heads import VariationalHead


@pytest.mark.parametrize("true_t", [0.5, 2.0, 30.0])
def test_temperature_scaling_recovers_a_known_temperature(true_t):
    """Labels drawn from softmax(z / T*): the fitted T is within 5 % of T* (T* = 30 is beyond a grid capped at e³)."""
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(20000, 4, generator=g)
    labels = torch.multinomial((logits / true_t).softmax(-1), 1, generator=g).squeeze(-1)
    assert optimal_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_temperature_scaling_ignores_missing_options():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(5000, 4, generator=g)
    labels = torch.multinomial((logits / 2.0).softmax(-1), 1, generator=g).squeeze(-1)
    padded = torch.cat([logits, torch.full((5000, 1), float("-inf"))], -1)
    assert optimal_temperature(padded, labels) == pytest.approx(optimal_temperature(logits, labels), rel=1e-6)


@pytest.mark.parametrize("rows,classes", [(1, 4), (3, 3)])
def test_laplace_evidence_matches_a_brute_force_slogdet(rows, classes):
    """log p(D|δ) from the GGN eigenvalues = the formula with slogdet of the (block) Hessian + δI, by autograd."""
    g = torch.Generator().manual_seed(0)
    features, n = 4, 60
    loc = torch.randn(rows, features, generator=g, dtype=torch.float64)
    phi = torch.randn(n, 1 if rows == classes else classes, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    prior_loc = torch.randn(rows, features, generator=g, dtype=torch.float64)

    def loglik(w):
        return head_logits(w.reshape(rows, features), phi).log_softmax(-1).gather(-1, y.unsqueeze(-1)).sum()

    hessian = -torch.autograd.functional.hessian(loglik, loc.reshape(-1))
    if rows > 1:  # the Laplace fit keeps the per-row blocks of the GGN (= of the Hessian) only
        keep = torch.block_diag(*[torch.ones(features, features, dtype=torch.float64)] * rows)
        hessian = hessian * keep
    delta = 0.7
    _, logdet = torch.linalg.slogdet(hessian + delta * torch.eye(rows * features, dtype=torch.float64))
    brute = (loglik(loc).item() - 0.5 * delta * (loc - prior_loc).pow(2).sum().item()
             + 0.5 * loc.numel() * math.log(delta) - 0.5 * logdet.item())
    eigenvalues = torch.linalg.eigvalsh(ggn_blocks(loc, phi))
    assert laplace_evidence(loc, prior_loc, loglik(loc).item(), eigenvalues, delta) == pytest.approx(brute, rel=1e-9)
    # and fit_laplace maximises that evidence for the prior mean it is given
    _, best = fit_laplace(loc, phi, y, prior_precision="marglik", prior_loc=prior_loc)
    _, ignoring_mean = fit_laplace(loc, phi, y, prior_precision="marglik")
    assert best != pytest.approx(ignoring_mean, rel=1e-3)


def test_guide_gradients_are_clipped_to_a_global_norm_of_the_per_example_loss():
    """What the guide's Adam gets: ∇(−ELBO/N) rescaled to global norm clip_norm (not N·∇, not clamped per entry)."""
    g = torch.Generator().manual_seed(0)
    n, dim = 320, 5
    features = Features(torch.randn(n, 3, dim, generator=g), torch.ones(n, 3, dtype=torch.bool))
    labels = torch.randint(0, 3, (n,), generator=g)
    clip = 0.05
    head = VariationalHead(dim, 1, load_prior("isotropic"), "full", dataset_size=n, clip_norm=clip)
    head.setup(features, labels)
    with head.scope():
        params = dict(pyro.get_param_store().named_parameters())
        names = sorted(params)
        loss = head.loss(features, labels)  # −ELBO / N (Jensen: deterministic)
        expected = torch.autograd.grad(loss, [params[k] for k in names])
        norm = torch.sqrt(sum(e.pow(2).sum() for e in expected))
        assert norm > clip  # the check below clips
        args, kwargs = head._args(features, labels)
        head.svi.loss_and_grads(head.model, head.elbo_guide, *args, **kwargs)
        got = [params[k].grad for k in names]  # unconstrained parameters
    for name, e, a in zip(names, expected, got):
        torch.testing.assert_close(a, e * clip / norm, rtol=1e-4, atol=1e-7, msg=name)


def test_ensemble_member_seeds_never_collide():
    """Members of seeds 0-3 (M = 4) draw 16 distinct streams from torch's generator, none a plain run's."""
    pairs = [_member_config(FitConfig(seed=s, method="lora-ensemble"), m) for s in range(4) for m in range(4)]
    assert all(config.method == "lora-mle" for config, _ in pairs)

    def first_draw(seed):
        torch.manual_seed(seed)
        return tuple(torch.rand(4).tolist())

    members = {first_draw(seed) for _, seed in pairs}
    plain = {first_draw(seed) for seed in range(64)}
    assert len(members) == 16 and not members & plain


def test_map_regularises_the_adapters_by_default():
    assert FitConfig(method="lora-map").weight_decay == pytest.approx(1e-2)
    assert FitConfig(method="lora-laplace").weight_decay == pytest.approx(1e-2)


def test_seed_range():
    from bayes_polar.errors import ConfigError

    with pytest.raises(ConfigError, match="seed < 2\\*\\*19"):
        FitConfig(seed=2 ** 19)
