"""Optimisers: Riemannian Adam keeps X, Y on the manifold, landing stays near it, state dicts resume."""
import copy

import pytest
import torch

from bayes_polar.adapters import (
    LANDING_TOLERANCE,
    LandingAdamW,
    assert_orthogonal,
    inject_polar,
    landing_field,
    make_adapter_optimizer,
    orthogonality_error,
    param_groups,
    polar_layers,
)
from bayes_polar.adapters._geoopt import geoopt
from bayes_polar.errors import ConfigError


def train(model, optimizer, ids, steps, every=None):
    """Next-token CE steps; returns (losses, worst orthogonality error seen every ``every`` steps)."""
    losses, worst = [], 0.0
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if every and step % every == 0:
            worst = max(worst, max_orthogonality_error(model))
    return losses, worst


def max_orthogonality_error(model) -> float:
    return max(max(orthogonality_error(layer).values()) for _, layer in polar_layers(model))


def test_riemannian_adam_keeps_factors_orthonormal_for_1000_steps(tiny_llama, sentence_ids):
    model, _ = tiny_llama
    inject_polar(model, rank=4)
    optimizer = make_adapter_optimizer(model, "riemannian_adam", lr=1e-2)
    assert isinstance(optimizer, geoopt.optim.RiemannianAdam)
    losses, _ = train(model, optimizer, sentence_ids, 1000)
    for _, layer in polar_layers(model):
        assert_orthogonal(layer, atol=1e-5)  # ||X^T X - I||_F <= 1e-5 in float32 after 1,000 steps
        assert layer.polar_theta.abs().max() > 0.1  # the adapters moved
    assert sum(losses[-10:]) / 10 < losses[0] - 0.1  # on a real loss that went down


def test_landing_stays_within_its_documented_tolerance(tiny_llama, sentence_ids):
    model, _ = tiny_llama
    inject_polar(model, rank=4)
    optimizer = make_adapter_optimizer(model, "landing", lr=1e-3, landing_lambda=1.0)
    assert isinstance(optimizer, LandingAdamW)
    losses, worst = train(model, optimizer, sentence_ids, 1000, every=10)
    assert 0 < worst <= LANDING_TOLERANCE  # off the manifold (no retraction), but within the bound
    assert sum(losses[-10:]) / 10 < losses[0] - 0.1


def test_landing_pulls_an_off_manifold_factor_back(tiny_llama, sentence_ids):
    model, _ = tiny_llama
    inject_polar(model, rank=4, layers=[-1])
    with torch.no_grad():
        for _, layer in polar_layers(model):
            layer.polar_X.mul_(1.1)  # ||X^T X - I||_F = 0.21 * sqrt(4) = 0.42
    start = max_orthogonality_error(model)
    optimizer = make_adapter_optimizer(model, "landing", lr=1e-3)
    train(model, optimizer, sentence_ids, 200)
    assert start > 0.4 and max_orthogonality_error(model) < LANDING_TOLERANCE


def test_landing_field_matches_its_formula():
    torch.manual_seed(0)
    x = torch.randn(7, 3, dtype=torch.float64)
    grad = torch.randn(7, 3, dtype=torch.float64)
    expected = (grad @ x.T - x @ grad.T) @ x + 0.5 * x @ (x.T @ x - torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(landing_field(x, grad, 0.5), expected, rtol=0, atol=1e-12)
    q = torch.linalg.qr(x).Q  # on the manifold: no normal term, X^T (field) is skew
    field = landing_field(q, grad, 0.5)
    torch.testing.assert_close(q.T @ field, -(q.T @ field).T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [32, 576])
def test_riemannian_adam_step_is_lr_in_frobenius_norm_and_adam_s_is_lr_per_entry(rows):
    """What PoLAR's learning rates mean (config ``stiefel_lr``): geoopt keeps one second moment per
    matrix, so a first step moves a Stiefel factor by ≈ lr in Frobenius norm whatever its size, while
    Adam moves every entry by ≈ lr (lr·√(n r) in Frobenius norm, as LoRA's A and B)."""
    torch.manual_seed(0)
    manifold, lr, rank = geoopt.EuclideanStiefel(), 1e-3, 8
    x = geoopt.ManifoldParameter(manifold.random(rows, rank, dtype=torch.float64), manifold=manifold)
    a = torch.nn.Parameter(torch.randn(rows, rank, dtype=torch.float64))
    start_x, start_a = x.detach().clone(), a.detach().clone()
    grad = torch.randn(rows, rank, dtype=torch.float64)
    x.grad, a.grad = grad.clone(), grad.clone()
    make_adapter_optimizer([dict(params=[x], lr=lr)], "riemannian_adam").step()
    torch.optim.Adam([a], lr=lr).step()
    torch.testing.assert_close((x.detach() - start_x).norm().item(), lr, rtol=1e-3, atol=0)
    torch.testing.assert_close((a.detach() - start_a).abs().max().item(), lr, rtol=1e-6, atol=0)
    assert (a.detach() - start_a).norm().item() == pytest.approx(lr * (rows * rank) ** 0.5, rel=1e-6)


def test_param_groups_split_stiefel_and_euclidean(tiny_llama):
    model, _ = tiny_llama
    inject_polar(model, rank=4)
    groups = param_groups(model, lr=1e-3, theta_lr=5e-3, weight_decay=0.1, stabilize=10)
    stiefel, euclidean = groups
    assert stiefel["name"] == "stiefel" and len(stiefel["params"]) == 8
    assert all(isinstance(p, geoopt.ManifoldParameter) for p in stiefel["params"])
    assert (stiefel["lr"], stiefel["weight_decay"], stiefel["stabilize"]) == (1e-3, 0.0, 10)
    assert euclidean["name"] == "euclidean" and len(euclidean["params"]) == 4
    assert (euclidean["lr"], euclidean["weight_decay"]) == (5e-3, 0.1)
    optimizer = make_adapter_optimizer(groups, "riemannian_adam")
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-3]


@pytest.mark.parametrize("name", ["riemannian_adam", "landing"])
def test_state_dict_round_trip_gives_identical_next_steps(tiny_llama, sentence_ids, name):
    model, _ = tiny_llama
    inject_polar(model, rank=4)
    optimizer = make_adapter_optimizer(model, name, lr=1e-2, theta_lr=2e-2, weight_decay=0.01)
    train(model, optimizer, sentence_ids, 3)
    checkpoint_model = copy.deepcopy(model.state_dict())
    checkpoint_optim = copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, sentence_ids, 3)
    expected = {k: v.clone() for k, v in model.state_dict().items() if "polar_" in k}

    model.load_state_dict(checkpoint_model)
    resumed = make_adapter_optimizer(model, name, lr=1.0)  # settings come from the state dict
    resumed.load_state_dict(checkpoint_optim)
    assert [g["lr"] for g in resumed.param_groups] == [1e-2, 2e-2]
    train(model, resumed, sentence_ids, 3)
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key


def _as_saved(obj):
    """What a checkpoint gives back: contiguous copies (safetensors stores no strides)."""
    if torch.is_tensor(obj):
        return obj.detach().clone().contiguous()
    if isinstance(obj, dict):
        return {k: _as_saved(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_saved(v) for v in obj)
    return obj


@pytest.mark.parametrize("name", ["riemannian_adam", "landing"])
def test_state_from_a_checkpoint_resumes_bit_for_bit(tiny_llama, sentence_ids, name):
    """X, Y are column-major (Q of a QR) and so are their Adam moments; contiguous saved copies get that back."""
    model, _ = tiny_llama
    inject_polar(model, rank=4)
    optimizer = make_adapter_optimizer(model, name, lr=1e-2)
    train(model, optimizer, sentence_ids, 3)
    checkpoint_model, checkpoint_optim = _as_saved(model.state_dict()), _as_saved(optimizer.state_dict())
    assert any(p.stride() != _as_saved(p).stride() for p in optimizer.state), "a non-contiguous factor to test"
    train(model, optimizer, sentence_ids, 3)
    expected = {k: v.clone() for k, v in model.state_dict().items() if "polar_" in k}

    model.load_state_dict(checkpoint_model)
    resumed = make_adapter_optimizer(model, name, lr=1.0)
    resumed.load_state_dict(checkpoint_optim)
    for param, state in resumed.state.items():
        assert all(v.stride() == param.stride() for v in state.values() if torch.is_tensor(v) and v.ndim)
    train(model, resumed, sentence_ids, 3)
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_factory_rejects_unknown_names_and_bad_rates(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ConfigError, match="optimizer name must be one of \\('riemannian_adam', 'landing'\\), got 'sgd'"):
        make_adapter_optimizer(model, "sgd")
    inject_polar(model, rank=2)
    with pytest.raises(ConfigError, match="Expected lr > 0 but got 0"):
        make_adapter_optimizer(model, lr=0)


def test_factory_needs_trainable_parameters(tiny_llama):
    model, _ = tiny_llama  # frozen backbone, no adapters
    with pytest.raises(ConfigError, match="No trainable parameters"):
        make_adapter_optimizer(model)
