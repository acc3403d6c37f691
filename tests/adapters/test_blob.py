"""BLoB layers: closed-form KL, the initial σ, flipout's marginal, sampling in train mode only, gradients."""
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from bayes_polar.adapters import inject_lora, inject_polar
from bayes_polar.adapters.blob import (INIT_EPS, PRIOR_STD, BayesPolarLinear, adapter_kl, bayesian_layers, flipout,
                                       gaussian_kl, init_rho, kl_reweighting, softplus_inverse)
from bayes_polar.adapters.layer import PolarLinear
from bayes_polar.errors import ConfigError


def test_kl_matches_torch_distributions():
    mean, rho = torch.randn(4, 6), torch.randn(4, 6) - 2
    expected = kl_divergence(Normal(mean, nn.functional.softplus(rho)), Normal(0.0, PRIOR_STD)).sum()
    assert gaussian_kl(mean, rho).item() == pytest.approx(expected.item(), rel=1e-5)
    assert gaussian_kl(mean, rho, 1.3).item() == pytest.approx(
        kl_divergence(Normal(mean, nn.functional.softplus(rho)), Normal(0.0, 1.3)).sum().item(), rel=1e-5)


def test_initial_std_is_blobs_range_and_softplus_inverse_round_trips():
    sigma = nn.functional.softplus(init_rho((64, 64)))
    assert sigma.min() >= INIT_EPS ** 2 / 2 - 1e-7 and sigma.max() <= INIT_EPS ** 2 + 1e-7
    assert sigma.std() > 0  # drawn, not constant
    y = torch.tensor([1e-3, 0.05, 1.0, 7.0])
    assert torch.allclose(nn.functional.softplus(softplus_inverse(y)), y, rtol=1e-5)


def test_kl_reweighting_averages_one_over_a_cycle_and_grows_within_it():
    for period in (1, 5, 60):
        weights = [kl_reweighting(step, period) for step in range(period)]
        assert sum(weights) / period == pytest.approx((2 ** (period + 1) - 2) / (2 ** (period + 1) - 1))
        assert weights == sorted(weights)
        assert kl_reweighting(2 * period - 1, period) == weights[-1]  # cycles
    assert math.isfinite(kl_reweighting(9999, 10000)) and kl_reweighting(0, 10000) == 0.0  # no overflow
    with pytest.raises(ValueError):
        kl_reweighting(0, 0)


def test_flipout_has_the_marginal_of_a_sampled_weight():
    """Each output of ((x∘r)Eᵀ)∘s is N(0, Σ_j σ_kj² x_j²): the marginal of x ↦ E x with E ~ N(0, σ²)."""
    x, sigma = torch.randn(1, 5), torch.rand(3, 5) + 0.1
    draws = torch.cat([flipout(x, sigma) for _ in range(20000)])
    assert draws.mean(0).abs().max() < 0.05
    expected = (sigma.square() * x.square()).sum(-1)
    assert torch.allclose(draws.var(0), expected, rtol=0.05)
    rows = flipout(x.repeat(2000, 1), sigma)  # one E, signs per row: the rows differ
    assert rows.std(0).min() > 0


def _polar(seed=0) -> BayesPolarLinear:
    torch.manual_seed(seed)
    layer = BayesPolarLinear(nn.Linear(8, 6), r=3, alpha=6)
    with torch.no_grad():
        layer.polar_theta.normal_()
        layer.polar_theta_rho.fill_(float(softplus_inverse(torch.tensor(0.3))))
    return layer


def test_polar_blob_eval_is_the_posterior_mean_and_train_samples():
    layer, x = _polar(), torch.randn(4, 8)
    plain = PolarLinear(layer.base_layer, r=3, alpha=6)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "polar_theta_rho"})
    layer.eval()
    assert torch.allclose(layer(x), plain(x), atol=1e-6) and torch.equal(layer(x), layer(x))
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)
    mean = plain(x).detach()
    errors = [(torch.stack([layer(x) for _ in range(n)]).mean(0) - mean).abs().mean().item() for n in (4, 400)]
    assert errors[1] < errors[0] / 4  # the Monte Carlo mean converges (≈ 1/√N) to the mean weight's output


def test_gradients_reach_mean_and_std_of_both_layers(tiny_llama):
    layer, x = _polar(), torch.randn(4, 8)
    layer.train()
    (layer(x).square().sum() + layer.kl()).backward()
    assert layer.polar_theta.grad.abs().sum() > 0 and layer.polar_theta_rho.grad.abs().sum() > 0

    model, _ = tiny_llama
    inject_lora(model, rank=4, layers=[-1], bayesian=True)
    (name, lora), *_ = bayesian_layers(model)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()  # B = 0 at init hides A's noise from the data term
    lora.train()
    lora(torch.randn(2, 3, lora.in_features)).square().sum().backward()
    assert lora.lora_A["default"].weight.grad.abs().sum() > 0 and lora.lora_A_rho["default"].grad.abs().sum() > 0


def test_injected_layers_sum_their_kl_and_freeze_the_rest(tiny_llama, fresh_tiny_llama):
    model, _ = tiny_llama
    inject_polar(model, rank=4, layers=[-1], bayesian=True)
    layers = bayesian_layers(model)
    assert len(layers) == 2 and all(isinstance(m, BayesPolarLinear) for _, m in layers)
    assert adapter_kl(model).item() == pytest.approx(sum(m.kl().item() for _, m in layers), rel=1e-6)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"polar_X", "polar_Y", "polar_theta", "polar_theta_rho"}
    with pytest.raises(ConfigError, match="no BLoB layers"):
        adapter_kl(fresh_tiny_llama())


def test_lora_blob_starts_equal_to_the_base_model(tiny_llama, fresh_tiny_llama):
    """B = 0 at init: even a sampled pass is the base model's (like plain LoRA)."""
    model, _ = tiny_llama
    base = fresh_tiny_llama()
    inject_lora(model, rank=4, layers=[-1], bayesian=True)
    ids = torch.randint(0, 100, (2, 6))
    model.train()
    assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-5)
