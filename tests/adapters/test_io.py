"""save/load in safetensors (exact round trip, manifest checks) and whole-model merge/unmerge."""
import json

import pytest
import torch

from bayes_polar.adapters import (
    adapter_state_dict,
    inject_polar,
    load_adapters,
    merge_adapters,
    polar_layers,
    save_adapters,
    unmerge_adapters,
)
from bayes_polar.adapters.io import read_adapters
from bayes_polar.errors import AdapterMismatchError, BayesPolarWarning, CheckpointError, ConfigError


def randomise_(model) -> None:
    """Move every PoLAR parameter away from its init (Θ nonzero, X and Y re-drawn)."""
    with torch.no_grad():
        for _, layer in polar_layers(model):
            layer.polar_theta.normal_()
            layer.polar_X.copy_(layer.manifold.random(*layer.polar_X.shape))
            layer.polar_Y.copy_(layer.manifold.random(*layer.polar_Y.shape))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def trained(tiny_llama):
    """A tiny Llama with rank-4 PoLAR adapters on the last block, moved off their init."""
    model, _ = tiny_llama
    inject_polar(model, rank=4, alpha=8, layers=[-1])
    randomise_(model)
    return model


def test_round_trip_into_a_fresh_backbone_is_bit_exact(trained, fresh_tiny_llama, sentence_ids, tmp_path):
    path = save_adapters(trained, tmp_path / "adapters.safetensors")
    fresh = fresh_tiny_llama()  # no adapters: injected from the saved config
    load_adapters(fresh, path)
    assert fresh.polar_targets == trained.polar_targets and fresh.polar_config == trained.polar_config
    assert torch.equal(logits(fresh, sentence_ids), logits(trained, sentence_ids))
    for key, value in adapter_state_dict(trained).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value)


def test_file_holds_only_adapters_and_the_config(trained, tmp_path):
    tensors, metadata = read_adapters(save_adapters(trained, tmp_path / "a.safetensors"))
    layer = "model.layers.1.self_attn.q_proj"
    assert set(tensors) == {f"{m}.polar_{k}" for m in trained.polar_targets for k in ("X", "Y", "theta")}
    assert tensors[f"{layer}.polar_X"].shape == (32, 4)
    assert json.loads(metadata["polar_config"])["r"] == 4 and "lora_config" not in metadata


def test_loading_into_an_injected_model_overwrites_its_adapters(trained, fresh_tiny_llama, sentence_ids, tmp_path):
    path = save_adapters(trained, tmp_path / "a.safetensors")
    other = fresh_tiny_llama()
    inject_polar(other, rank=4, alpha=8, layers=[-1])
    other.get_submodule("model.layers.1.self_attn.v_proj").polar_theta.data.normal_()
    assert not torch.equal(logits(other, sentence_ids), logits(trained, sentence_ids))
    load_adapters(other, path)
    assert torch.equal(logits(other, sentence_ids), logits(trained, sentence_ids))


@pytest.mark.parametrize(
    "kwargs, problem",
    [(dict(rank=2, alpha=8, layers=[-1]), "shape mismatch (6): ['model.layers.1.self_attn.q_proj.polar_X: file (32, 4) vs model (32, 2)'"),
     (dict(rank=4, alpha=8, layers=[0]), "missing in file (6): ['model.layers.0.self_attn.q_proj.polar_X'")],
)
def test_manifest_mismatch_is_a_clear_error(trained, fresh_tiny_llama, tmp_path, kwargs, problem):
    path = save_adapters(trained, tmp_path / "a.safetensors")
    other = fresh_tiny_llama()
    inject_polar(other, **kwargs)
    with pytest.raises(AdapterMismatchError) as info:
        load_adapters(other, path)
    assert "does not fit this model's adapters" in str(info.value) and problem in str(info.value)


def test_missing_corrupt_and_foreign_files_are_checkpoint_errors(trained, tmp_path):
    with pytest.raises(CheckpointError, match="No adapter file at"):
        load_adapters(trained, tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_adapters(trained, tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="has format None, expected 'bayes-polar-adapters/1'"):
        load_adapters(trained, tmp_path / "foreign.safetensors")


def test_save_needs_adapters_and_load_refuses_merged_layers(trained, fresh_tiny_llama, tmp_path):
    bare = fresh_tiny_llama()
    with pytest.raises(ConfigError, match="no PoLAR or LoRA adapters"):
        save_adapters(bare, tmp_path / "a.safetensors")
    path = save_adapters(trained, tmp_path / "a.safetensors")
    merge_adapters(trained)
    with pytest.raises(ConfigError, match="call unmerge_adapters\\(model\\) before load_adapters"):
        load_adapters(trained, path)


def test_merge_adapters_forward_equals_adapter_forward(trained, sentence_ids):
    """Merged logits match the adapter forward to float32 rounding (atol 1e-4 on logits of size ~1)."""
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in polar_layers(trained)}
    expected = logits(trained, sentence_ids)
    assert merge_adapters(trained) == trained.polar_targets
    torch.testing.assert_close(logits(trained, sentence_ids), expected, rtol=0, atol=1e-4)
    with pytest.warns(BayesPolarWarning, match="already merged"):
        assert merge_adapters(trained) == []
    assert unmerge_adapters(trained) == trained.polar_targets
    for name, layer in polar_layers(trained):  # W0 restored to float32 rounding
        torch.testing.assert_close(layer.base_layer.weight.detach(), weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(trained, sentence_ids), expected, rtol=0, atol=1e-4)
