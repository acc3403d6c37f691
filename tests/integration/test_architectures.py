"""Decoder families beyond Llama, each on a tiny random-init config (no download).

PoLAR injection on the family's default targets keeps X, Y orthonormal; the prefix cache equals the
full pass; a short fit runs in both formats; export reloads with the adapted logits (and a peft
folder for LoRA). A model type without defaults, or a decoder without a block list, is refused with
the supported families named.
"""
import json
import warnings

import pytest
import torch
import transformers

from bayes_polar.adapters import adapters_disabled, inject_polar, make_adapter_optimizer, orthogonality_error, polar_layers
from bayes_polar.adapters.architectures import FAMILIES, supported_families
from bayes_polar.data.features import FeatureExtractor, FullTrunk, option_loglik
from bayes_polar.data.formats import encode_task, make_loader
from bayes_polar.data.prefix_cache import CachedTrunk
from bayes_polar.data.tasks import Example, Task
from bayes_polar.errors import UnsupportedArchitectureError
from bayes_polar.export import export_run
from bayes_polar.run import build_pipeline, load_run, run_fit

from .test_fit import tiny_config

pytestmark = pytest.mark.integration

SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=512)
ATTENTION = dict(num_key_value_heads=2)
GEMMA = dict(num_key_value_heads=2, head_dim=8, sliding_window=8, final_logit_softcapping=0.5)  # window < prompt; a cap that bites
LAYER_TYPES = ["sliding_attention", "full_attention"]
CONFIGS = {  # model_type -> (config class, family-specific settings)
    "llama": (transformers.LlamaConfig, ATTENTION),
    "mistral": (transformers.MistralConfig, dict(ATTENTION, sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, ATTENTION),
    "qwen3": (transformers.Qwen3Config, dict(ATTENTION, head_dim=8)),
    "gemma": (transformers.GemmaConfig, dict(num_key_value_heads=2, head_dim=8)),
    "gemma2": (transformers.Gemma2Config, dict(GEMMA, attn_logit_softcapping=10.0)),
    "gemma3_text": (transformers.Gemma3TextConfig, GEMMA),
    "phi3": (transformers.Phi3Config, ATTENTION),
    "gpt_neox": (transformers.GPTNeoXConfig, dict(rotary_pct=0.5)),
}


EXAMPLES = [  # the options of each question share their context: the prefix cache shares it
    Example("Which gas do plants absorb from the air?", ("oxygen", "carbon dioxide", "nitrogen"), 1, "a"),
    Example("What is two plus two?", ("four", "five", "three plus one", "six"), 0, "b"),
    Example("Where does the sun rise?", ("in the east", "in the west"), 0, "c"),
]


def _task():
    return Task("toy", "train", EXAMPLES, 4, tuple("ABCDE"), "mem", kind="qa")


def tiny_model(model_type, tokenizer, num_layers=2, seed=0):
    """A random-init causal LM of the family with SmolLM2's vocabulary, in eval mode and frozen."""
    config_class, settings = CONFIGS[model_type]
    extra = dict(layer_types=(LAYER_TYPES * num_layers)[:num_layers]) if model_type in ("gemma2", "gemma3_text") else {}
    config = config_class(vocab_size=len(tokenizer), num_hidden_layers=num_layers, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SIZES,
                          **settings, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert model.config.model_type == model_type
    return model.requires_grad_(False).eval()


def _moved_theta(model, scale=0.5):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("polar_theta"):
                p.normal_(0, scale)


def test_every_family_is_covered():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_default_targets_and_orthonormal_factors_after_steps(model_type, tokenizer):
    model = tiny_model(model_type, tokenizer)
    inject_polar(model, rank=2, layers=[-1])
    defaults = FAMILIES[model_type][1]
    assert [name.rsplit(".", 1)[-1] for name in model.polar_targets] == list(defaults)
    assert all(".1." in name for name in model.polar_targets)  # the last of two blocks
    ids = tokenizer(["The sun rises in the east."], return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
    optimizer = make_adapter_optimizer(model, "riemannian_adam", lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        model(input_ids=ids).logits[0, -1, :8].pow(2).sum().backward()
        optimizer.step()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-4  # the steps changed the model
    for _, layer in polar_layers(model):
        assert orthogonality_error(layer)["X"] < 1e-5 and orthogonality_error(layer)["Y"] < 1e-5


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_prefix_cache_equals_the_full_pass_in_both_formats(model_type, tokenizer):
    model = tiny_model(model_type, tokenizer, num_layers=4)
    inject_polar(model, rank=2, alpha=4, layers=[2, 3])
    _moved_theta(model)
    for fmt in ("options", "letters"):
        batch = next(iter(make_loader(encode_task(_task(), tokenizer, fmt), tokenizer, batch_size=3)))
        assert batch.input_ids.shape[1] > 8  # longer than the sliding windows
        real = batch.attention_mask.bool()
        full = FullTrunk(model)(batch)
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        torch.testing.assert_close(full[real], out.hidden_states[-1][real], atol=1e-5, rtol=1e-5)
        for share_prefix in (True, False):
            cached = CachedTrunk(model, 2, share_prefix=share_prefix)
            torch.testing.assert_close(cached(batch)[real], full[real], atol=1e-5, rtol=1e-5)
        uncached = FeatureExtractor(model, fmt).raw(batch).phi
        with_cache = FeatureExtractor(model, fmt, trunk=CachedTrunk(model, 2)).raw(batch).phi
        torch.testing.assert_close(with_cache, uncached, atol=1e-5, rtol=1e-5)
        if fmt == "options":  # the log-likelihood features are the LM's own (Gemma: soft-capped logits)
            logp = out.logits.float().log_softmax(-1)
            width = batch.input_ids.shape[1]
            expected = torch.stack([logp[i, width - n - 1:width - 1].gather(-1, batch.input_ids[i, width - n:, None]).sum()
                                    for i, n in enumerate(batch.continuation_lengths.tolist())])
            torch.testing.assert_close(option_loglik(model, full, batch)[:, 0], expected, atol=1e-4, rtol=1e-5)


def _logits(model, tokenizer):
    batch = tokenizer(["Question: Is the sea salty?\nAnswer: yes", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_fit_in_both_formats_and_export(model_type, tokenizer, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / model_type
    base = tiny_model(model_type, tokenizer, num_layers=3)
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base_logits = _logits(base, tokenizer)
    for fmt, method in (("options", "polar-vbll"), ("letters", "lora-mle")):
        run = tmp_path / f"run-{fmt}"
        config = tiny_config(data_dir, model=str(folder), format=fmt, method=method, train_limit=8, eval_limit=4,
                             steps=3, checkpoint_every=0, max_length=64, rank=2, alpha=4, layers="-1", lr=5e-2,
                             warmup_steps=0, predictive_samples=16)
        metrics = run_fit(config, run, progress=False, log=lambda *_: None)
        result = metrics["evaluations"]["arc_easy/validation"]
        assert result["n"] == 4
        assert all(torch.isfinite(torch.tensor(float(result[k]))) for k in ("acc", "ece", "nll", "brier"))
        trace = [v for k, v in metrics.items() if k.endswith("_trace")]
        assert len(trace) == 1 and len(trace[0]) == 3 and torch.isfinite(torch.tensor(trace[0])).all()
        saved = json.loads((run / "metrics.json").read_text())["adapters"]
        assert [name.rsplit(".", 1)[-1] for name in saved] == list(FAMILIES[model_type][1])
        if method == "polar-vbll":
            assert max(v for layer in saved.values() for k, v in layer.items() if k.startswith("orthogonality")) < 1e-5
        export_run(run, tmp_path / f"export-{fmt}", log=lambda *_: None)
        card = (tmp_path / f"export-{fmt}" / "README.md").read_text()
        assert f"on `{','.join(sorted(FAMILIES[model_type][1]))}` in blocks" in card  # auto, resolved
        adapted = _logits(load_run(run).model, tokenizer)
        assert (adapted - base_logits).abs().max() > 1e-3  # the adapters moved the logits: the check can fail
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"export-{fmt}" / "model")
        assert (_logits(merged, tokenizer) - adapted).abs().max() <= 1e-4
        if method == "lora-mle":
            from peft import PeftModel

            with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder),
                                                       tmp_path / f"export-{fmt}" / "peft")
            assert (_logits(peft_model, tokenizer) - adapted).abs().max() <= 1e-5


def test_letters_zero_shot_is_the_lm_s_own_answer_distribution_softcap_included(tokenizer, data_dir, tmp_path):
    """Gemma 2 soft-caps its final logits (cap 0.5 here, which bites): the zero-shot row must too."""
    folder = tmp_path / "gemma2"
    tiny_model("gemma2", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    pipe = build_pipeline(tiny_config(data_dir, model=str(folder), format="letters", method="lora-mle", train_limit=4,
                                      max_length=64, rank=2, alpha=4, layers="-1"))
    answer_ids = torch.tensor(pipe.train.answer_ids)
    for batch in make_loader(pipe.train, pipe.tokenizer, batch_size=1):  # no padding: the plain forward is exact
        with torch.no_grad(), adapters_disabled(pipe.model):
            lm = pipe.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1, answer_ids]
        expected = lm.float().masked_fill(~batch.choice_mask, float("-inf")).softmax(-1)
        assert lm.abs().max() <= 0.5
        torch.testing.assert_close(pipe.method.zero_shot_proba(batch, pipe.zero_shot), expected, atol=1e-5, rtol=1e-4)


def test_a_family_without_defaults_is_refused_with_the_supported_list(tokenizer):
    config = transformers.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128)
    model = transformers.OPTForCausalLM(config).eval()
    with pytest.raises(UnsupportedArchitectureError) as info:
        inject_polar(model, rank=2)
    message = str(info.value)
    assert "No default target_modules for model type 'opt' (OPTForCausalLM)" in message
    assert supported_families() in message and "gpt_neox (GPT-NeoX (Pythia))" in message
    assert "q_proj" in message and isinstance(info.value, ValueError)  # its linear layers, to pass instead
    inject_polar(model, target_modules=["q_proj", "v_proj"], rank=2, layers=[-1])  # explicit targets work
    assert sorted(model.polar_targets) == ["model.decoder.layers.1.self_attn.q_proj", "model.decoder.layers.1.self_attn.v_proj"]


def test_a_decoder_without_one_block_list_is_refused_with_the_supported_list():
    from types import SimpleNamespace

    from torch import nn

    from bayes_polar.adapters import find_blocks

    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="mystery")
            self.encoder_stack = nn.ModuleList([nn.Linear(4, 4)])
            self.decoder_stack = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedArchitectureError) as info:
        find_blocks(TwoStacks())
    message = str(info.value)
    assert "Cannot tell the transformer blocks of TwoStacks (model type 'mystery')" in message
    assert "['decoder_stack', 'encoder_stack']" in message and supported_families() in message
    with pytest.raises(UnsupportedArchitectureError, match="Supported families: llama"):
        inject_polar(TwoStacks(), target_modules=["0"], rank=2, layers=[-1])
