"""PolarLinear: init on the manifold, zero update at init, forward formula, gradients, merge/unmerge."""
import pytest
import torch
from torch import nn

from bayes_polar.adapters import PolarLinear, assert_orthogonal
from bayes_polar.adapters._geoopt import geoopt
from bayes_polar.errors import BayesPolarWarning, ConfigError, UnsupportedModuleError


def make_layer(in_features=16, out_features=12, r=4, alpha=8.0, dtype=torch.float32, theta=True):
    layer = PolarLinear(nn.Linear(in_features, out_features, dtype=dtype), r=r, alpha=alpha)
    if theta:
        with torch.no_grad():
            layer.polar_theta.normal_()
    return layer


def test_parameters_are_tall_stiefel_factors_on_one_manifold():
    layer = make_layer(theta=False)
    assert isinstance(layer.manifold, geoopt.EuclideanStiefel)
    for name, shape in (("polar_X", (12, 4)), ("polar_Y", (16, 4))):
        param = getattr(layer, name)
        assert isinstance(param, geoopt.ManifoldParameter) and param.manifold is layer.manifold
        assert param.shape == shape
    assert type(layer.polar_theta) is nn.Parameter and torch.equal(layer.polar_theta, torch.zeros(4, 4))
    assert_orthogonal(layer, atol=1e-6)
    assert layer.scaling == 2.0


def test_init_follows_the_global_torch_seed():
    torch.manual_seed(3)
    first = make_layer(theta=False)
    torch.manual_seed(3)
    second = make_layer(theta=False)
    assert torch.equal(first.polar_X, second.polar_X) and torch.equal(first.polar_Y, second.polar_Y)


def test_zero_theta_gives_exactly_the_base_output():
    layer = make_layer(theta=False)
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_forward_matches_the_defining_equation():
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    X, Y, theta = layer.polar_X.detach(), layer.polar_Y.detach(), layer.polar_theta.detach()
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + layer.scaling * x @ (X @ theta @ Y.T).T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), layer.scaling * X @ theta @ Y.T, rtol=0, atol=1e-12)


def test_gradients_of_X_Y_theta_match_finite_differences():
    layer = make_layer(in_features=6, out_features=5, r=2, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)

    def output(X, Y, theta):
        return torch.func.functional_call(layer, {"polar_X": X, "polar_Y": Y, "polar_theta": theta}, (x,))

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in (layer.polar_X, layer.polar_Y, layer.polar_theta))
    assert torch.autograd.gradcheck(output, inputs, eps=1e-6, atol=1e-8)


def test_low_precision_base_gets_float32_adapters():
    layer = make_layer(dtype=torch.bfloat16, theta=False)
    assert layer.polar_X.dtype == layer.polar_theta.dtype == torch.float32
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_merged_forward_equals_adapter_forward(dtype, atol):
    """Merged and unmerged forwards agree to float rounding: atol 1e-12 in float64, 1e-5 in float32."""
    layer = make_layer(dtype=dtype)
    x = torch.randn(3, 16, dtype=dtype)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_merge_then_unmerge_restores_the_base_weight(dtype, atol):
    layer = make_layer(dtype=dtype)
    weight = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.allclose(layer.base_layer.weight, weight)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight, rtol=0, atol=atol)


def test_repeated_merge_and_unmerge_warn_and_do_nothing():
    layer = make_layer()
    with pytest.warns(BayesPolarWarning, match="not merged; unmerge"):
        layer.unmerge()
    layer.merge()
    weight = layer.base_layer.weight.detach().clone()
    with pytest.warns(BayesPolarWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, weight) and layer.merged


@pytest.mark.parametrize(
    "r, message",
    [(0, "Expected r > 0 but got 0"), (13, "Expected r <= min(in_features, out_features) = 12 but got 13")],
)
def test_bad_rank_is_rejected_with_the_value(r, message):
    with pytest.raises(ConfigError) as info:
        PolarLinear(nn.Linear(16, 12), r=r)
    assert message in str(info.value)


def test_only_linear_layers_can_be_wrapped():
    with pytest.raises(UnsupportedModuleError, match="wraps torch.nn.Linear layers, got Conv1d"):
        PolarLinear(nn.Conv1d(4, 4, 1), r=2)
