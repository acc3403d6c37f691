"""bayes-polar export: a merged model plain transformers reloads with the adapted logits, the head, a peft folder."""
import json
import warnings

import pytest
import torch

from bayes_polar.cli import main
from bayes_polar.config import FitConfig
from bayes_polar.run import load_run, run_fit

pytestmark = pytest.mark.integration


def _fit(tmp_path, data_dir, method):
    config = FitConfig(model="tiny-random-llama", task="arc_easy", data_dir=str(data_dir), train_limit=8,
                       eval_limit=4, steps=3, batch_size=4, layers="-1", rank=2, alpha=4, threads=1,
                       checkpoint_every=0, max_length=64, method=method, lr=5e-2, warmup_steps=0)
    run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    return tmp_path / "run"


def _logits(model, tokenizer):
    batch = tokenizer(["Question: Is the sea salty?\nAnswer: yes", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


@pytest.mark.parametrize("method", ["polar-vbll", "lora-mle"])
def test_export_reloads_with_plain_transformers(tmp_path, data_dir, method, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = _fit(tmp_path, data_dir, method)
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    exp = tmp_path / "exp"
    pipe = load_run(run)
    adapted = _logits(pipe.model, pipe.tokenizer)
    merged, info = AutoModelForCausalLM.from_pretrained(exp / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not [k for k in load_file(exp / "model" / "model.safetensors") if "base_layer" in k or "polar_" in k
                or "lora_" in k]
    from bayes_polar.data.backbone import tiny_random_llama

    base = _logits(tiny_random_llama()[0], pipe.tokenizer)
    got = _logits(merged, pipe.tokenizer)
    assert (got - adapted).abs().max() <= 1e-4
    assert (adapted - base).abs().max() > 1e-3  # the adapters moved the logits: the check can fail
    head = json.loads((exp / "head" / "head.json").read_text())
    tensors = load_file(exp / "head" / "head.safetensors")
    assert head["format"] == "options" and tensors["zero_shot"].shape == (1, head["feature_dim"])
    assert ("loc" in tensors and "factor" in tensors) if method == "polar-vbll" else "weight" in tensors
    # the exported recipe alone (raw features -> centre -> divide by feature_scale -> W) gives the run's point
    from bayes_polar.data.formats import make_loader
    from bayes_polar.run import encode_eval

    batch = next(iter(make_loader(encode_eval(pipe, "arc_easy", "validation", data_dir, limit=4), pipe.tokenizer,
                                  batch_size=4)))
    raw = pipe.method.extractor.raw(batch)
    mask = raw.mask.unsqueeze(-1).float()
    phi = (raw.phi - (raw.phi * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)) * mask
    phi = phi / tensors["feature_scale"]
    weights = tensors["loc"] if method == "polar-vbll" else tensors["weight"] / head.get("temperature", 1.0)
    logits = (phi @ weights.T).squeeze(-1).masked_fill(~raw.mask.bool(), float("-inf"))
    expected = pipe.method.head.point_proba(pipe.method.features(batch))
    torch.testing.assert_close(logits.softmax(-1), expected, rtol=1e-4, atol=1e-5)
    assert "feature_scale" in head["feature_normalisation"]
    assert (exp / "README.md").read_text().startswith(f"# {method} on arc_easy")
    assert json.loads((exp / "export.json").read_text())["parts"][0]["max_logit_difference"] <= 1e-4
    if method == "lora-mle":
        from peft import PeftModel

        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(tiny_random_llama()[0], exp / "peft")
        assert (_logits(peft_model, pipe.tokenizer) - adapted).abs().max() <= 1e-5
    else:
        assert not (exp / "peft").exists()
    assert main(["export", str(run), "--out", str(exp)]) == 1  # never replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_merge_and_unload_leaves_plain_linear_layers(tiny_llama):
    from bayes_polar.adapters import inject_polar
    from bayes_polar.export import merge_and_unload

    model, tokenizer = tiny_llama
    inject_polar(model, rank=2, layers=[-1])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "polar_theta" in name:
                p.normal_()
    before = _logits(model, tokenizer)
    merge_and_unload(model)
    assert type(model.model.layers[-1].self_attn.q_proj) is torch.nn.Linear
    assert not hasattr(model, "polar_targets")
    assert (_logits(model, tokenizer) - before).abs().max() <= 1e-5
