"""Stable rank (dense, and cheap through QR for PoLAR and LoRA) and orthogonality checks."""
import pytest
import torch
from torch import nn

from bayes_polar.adapters import (
    PolarLinear,
    adapter_diagnostics,
    assert_orthogonal,
    inject_lora,
    inject_polar,
    layer_stable_rank,
    lora_layers,
    orthogonality_error,
    stable_rank,
)
from bayes_polar.errors import OffManifoldError


@pytest.mark.parametrize(
    "matrix, expected",
    [
        (torch.diag(torch.tensor([3.0, 4.0, 0.0])), 25 / 16),  # (9 + 16) / 16
        (torch.outer(torch.arange(1.0, 4.0), torch.ones(5)), 1.0),  # rank one
        (torch.eye(4), 4.0),
        (torch.zeros(3, 5), 0.0),  # documented convention for ΔW = 0
    ],
)
def test_stable_rank_of_known_matrices(matrix, expected):
    assert stable_rank(matrix) == pytest.approx(expected, abs=1e-12)


def off_manifold_layer() -> PolarLinear:
    layer = PolarLinear(nn.Linear(20, 10, dtype=torch.float64), r=4, alpha=8)
    with torch.no_grad():
        layer.polar_theta.normal_()
        layer.polar_X.add_(0.1 * torch.randn_like(layer.polar_X))  # off the manifold on purpose
    return layer


def test_polar_stable_rank_via_qr_equals_the_dense_one_even_off_manifold():
    layer = off_manifold_layer()
    assert orthogonality_error(layer)["X"] > 0.05
    dense = stable_rank(layer.delta_weight())
    assert 1.0 < dense < 4.0
    assert layer_stable_rank(layer) == pytest.approx(dense, rel=1e-10)


def test_lora_stable_rank_via_qr_equals_the_dense_one(tiny_llama):
    model, _ = tiny_llama
    inject_lora(model, rank=4)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
        dense = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert layer_stable_rank(layer) == pytest.approx(stable_rank(dense), rel=1e-6)


def test_orthogonality_error_and_its_assertion():
    layer = off_manifold_layer()
    X = layer.polar_X.detach()
    errors = orthogonality_error(layer)
    assert errors["X"] == pytest.approx(torch.linalg.matrix_norm(X.T @ X - torch.eye(4, dtype=X.dtype)).item())
    assert errors["Y"] < 1e-12
    with pytest.raises(OffManifoldError, match=r"\|\|X\^T X - I\|\|_F = .* > atol = 1e-05") as info:
        assert_orthogonal(layer, atol=1e-5)
    assert isinstance(info.value, AssertionError)
    assert_orthogonal(layer, atol=errors["X"] + 1e-9)


def test_adapter_diagnostics_report_per_module(tiny_llama):
    model, _ = tiny_llama
    inject_polar(model, rank=4)
    report = adapter_diagnostics(model)
    assert list(report) == model.polar_targets
    for entry in report.values():
        assert set(entry) == {"stable_rank", "orthogonality_error_X", "orthogonality_error_Y"}
        assert entry["stable_rank"] == 0.0  # Θ = 0 at init
        assert entry["orthogonality_error_X"] < 1e-5 and entry["orthogonality_error_Y"] < 1e-5


def test_adapter_diagnostics_for_lora_has_stable_rank_only(tiny_llama):
    model, _ = tiny_llama
    inject_lora(model, rank=4, layers=[-1])
    report = adapter_diagnostics(model)
    assert list(report) == model.lora_targets
    assert all(entry == {"stable_rank": 0.0} for entry in report.values())  # B = 0 at init
