"""peft LoRA baseline: same targets as PoLAR, stays a LlamaForCausalLM, frozen base, save/load, merge."""
import pytest
import torch
from transformers import LlamaForCausalLM

from bayes_polar.adapters import (
    inject_lora,
    inject_polar,
    load_adapters,
    lora_layers,
    merge_adapters,
    save_adapters,
    unmerge_adapters,
)
from bayes_polar.errors import ConfigError, NoTargetModulesError


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(layers=[-1]),
        dict(target_modules=r".*\.(k|o)_proj", layers=[0]),
        dict(target_modules=["q_proj", "mlp.up_proj"], exclude_modules=["model.layers.0.mlp.up_proj"]),
    ],
)
def test_lora_targets_the_same_modules_as_polar(tiny_llama, fresh_tiny_llama, settings):
    polar, _ = tiny_llama
    lora = fresh_tiny_llama()
    inject_polar(polar, rank=2, **settings)
    inject_lora(lora, rank=2, **settings)
    assert lora.lora_targets == polar.polar_targets
    assert [name for name, _ in lora_layers(lora)] == polar.polar_targets


def test_lora_is_injected_in_place_with_the_base_frozen(tiny_llama, sentence_ids):
    model, _ = tiny_llama
    before = logits(model, sentence_ids)
    assert inject_lora(model, rank=4, alpha=8, layers=[-1], dropout=0.1) is model
    assert type(model) is LlamaForCausalLM
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.layers_to_transform, config.layers_pattern) == (4, 8.0, [1], "layers")
    model.eval()  # dropout off: B = 0 at init, so outputs are unchanged
    assert torch.equal(logits(model, sentence_ids), before)


def test_lora_save_load_round_trip_is_exact(tiny_llama, fresh_tiny_llama, sentence_ids, tmp_path):
    model, _ = tiny_llama
    inject_lora(model, rank=4, layers=[-1])
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_()
    path = save_adapters(model, tmp_path / "lora.safetensors")
    fresh = fresh_tiny_llama()
    load_adapters(fresh, path)  # injects from the saved LoRA settings, then loads
    assert fresh.lora_targets == model.lora_targets
    assert torch.equal(logits(fresh, sentence_ids), logits(model, sentence_ids))


def test_lora_merge_and_unmerge(tiny_llama, sentence_ids):
    model, _ = tiny_llama
    inject_lora(model, rank=4)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_()
    expected = logits(model, sentence_ids)
    assert merge_adapters(model) == model.lora_targets
    torch.testing.assert_close(logits(model, sentence_ids), expected, rtol=0, atol=1e-4)
    assert unmerge_adapters(model) == model.lora_targets
    torch.testing.assert_close(logits(model, sentence_ids), expected, rtol=0, atol=1e-4)


def test_lora_errors(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(NoTargetModulesError, match="target_modules=\\('query',\\)"):
        inject_lora(model, target_modules=["query"])
    with pytest.raises(ConfigError, match="Expected r > 0 but got 0"):
        inject_lora(model, rank=0)
    with pytest.raises(ConfigError, match="Expected 0 <= dropout < 1 but got 1.5"):
        inject_lora(model, dropout=1.5)
