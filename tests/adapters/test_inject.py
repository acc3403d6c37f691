"""inject_polar on the tiny Llama: zero-init equality, matching, block selection, freezing, errors."""
import pytest
import torch

from bayes_polar.adapters import PolarConfig, PolarLinear, find_blocks, inject_polar, polar_layers
from bayes_polar.errors import ConfigError, NoTargetModulesError, UnsupportedModuleError

Q0, V0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
Q1, V1 = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def test_adapted_model_at_init_equals_the_base_model(tiny_llama, sentence_ids):
    model, _ = tiny_llama
    with torch.no_grad():
        before = model(input_ids=sentence_ids).logits
    inject_polar(model, rank=4)
    with torch.no_grad():
        after = model(input_ids=sentence_ids).logits
    assert torch.equal(after, before)


def test_default_targets_are_q_and_v_of_every_block(tiny_llama):
    model, _ = tiny_llama
    assert inject_polar(model, rank=4) is model
    assert model.polar_targets == [Q0, V0, Q1, V1]
    assert [name for name, _ in polar_layers(model)] == model.polar_targets
    assert all(isinstance(model.get_submodule(name), PolarLinear) for name in model.polar_targets)
    assert model.polar_config == PolarConfig(r=4, target_modules=("q_proj", "v_proj"))  # the default, resolved


def test_only_polar_parameters_are_trainable(tiny_llama):
    model, _ = tiny_llama
    inject_polar(model, rank=4)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    expected = [f"{t}.polar_{k}" for t in model.polar_targets for k in ("X", "Y", "theta")]
    assert sorted(trainable) == sorted(expected)


@pytest.mark.parametrize(
    "layers, expected",
    [([-1], [Q1, V1]), ([0], [Q0, V0]), ([0, -2], [Q0, V0]), ((1, 0), [Q0, V0, Q1, V1])],
)
def test_layers_select_blocks_with_negative_indices_from_the_end(tiny_llama, layers, expected):
    model, _ = tiny_llama
    inject_polar(model, rank=4, layers=layers)
    assert model.polar_targets == expected


def test_find_blocks_uses_the_decoder_block_list(tiny_llama):
    model, _ = tiny_llama
    name, blocks = find_blocks(model)
    assert name == "model.layers" and blocks is model.model.layers


def test_regex_targets_full_match_and_excludes_win(tiny_llama):
    model, _ = tiny_llama
    inject_polar(model, target_modules=r".*\.(q|k)_proj", rank=2, exclude_modules=[Q0])
    assert model.polar_targets == ["model.layers.0.self_attn.k_proj", Q1, "model.layers.1.self_attn.k_proj"]


def test_list_targets_match_exact_names_or_dotted_suffixes(tiny_llama):
    model, _ = tiny_llama
    inject_polar(model, target_modules=[Q1, "mlp.down_proj"], rank=2)
    assert model.polar_targets == ["model.layers.0.mlp.down_proj", Q1, "model.layers.1.mlp.down_proj"]


def test_config_argument_is_used_and_cannot_be_mixed(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ConfigError, match="either config or settings, not both; got config and \\['r'\\]"):
        inject_polar(model, rank=4, config=PolarConfig(r=2))
    inject_polar(model, config=PolarConfig(r=2, layers=[-1]))
    assert model.polar_targets == [Q1, V1] and model.get_submodule(Q1).r == 2


def test_no_match_raises_and_echoes_target_modules(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(NoTargetModulesError) as info:
        inject_polar(model, target_modules=["query"], rank=4)
    message = str(info.value)
    assert "No module matched target_modules=('query',)" in message and "q_proj" in message
    assert isinstance(info.value, ValueError)
    assert not any(isinstance(m, PolarLinear) for m in model.modules())


@pytest.mark.parametrize(
    "rank, message",
    [(0, "Expected r > 0 but got 0"), (17, "Expected r <= min(in_features, out_features) = 16 but got 17")],
)
def test_bad_rank_gives_the_documented_message(tiny_llama, rank, message):
    model, _ = tiny_llama
    with pytest.raises(ConfigError) as info:
        inject_polar(model, rank=rank)
    assert message in str(info.value)


def test_block_index_out_of_range(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ConfigError, match=r"layer indices in \[-2, 1\] for a model with 2 blocks but got 2"):
        inject_polar(model, rank=4, layers=[2])


def test_non_linear_match_and_second_injection_are_refused(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(UnsupportedModuleError, match="self_attn matched target_modules but is a LlamaAttention"):
        inject_polar(model, target_modules=["self_attn"], rank=4)
    inject_polar(model, rank=4, layers=[0])
    with pytest.raises(ConfigError, match="already carries PoLAR adapters"):
        inject_polar(model, rank=4, layers=[1])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21 x transformers 5
def test_peft_wrapped_model_is_unwrapped_and_its_lora_frozen(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llama
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(UnsupportedModuleError, match="k_proj already carries an adapter"):
        inject_polar(wrapped, target_modules=["k_proj"], rank=2)
    assert inject_polar(wrapped, rank=2, layers=[-1]) is wrapped
    assert wrapped.polar_targets == [Q1, V1]  # names relative to the transformers model
    trainable = {name.rsplit(".", 1)[-1] for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {"polar_X", "polar_Y", "polar_theta"}
