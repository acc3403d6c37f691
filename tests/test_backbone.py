"""Backbone loading: the embedded SmolLM2 default offline, the tiny random Llama, clear offline errors."""
import pytest
import torch

from bayes_polar.data import hub
from bayes_polar.data.backbone import cache_dir, load_backbone, tiny_random_llama
from bayes_polar.errors import OfflineError


def test_tiny_random_llama_is_seeded_and_matches_tokenizer():
    (a, tok), (b, _) = tiny_random_llama(seed=1), tiny_random_llama(seed=1)
    c, _ = tiny_random_llama(seed=2)
    assert a.config.vocab_size == len(tok) and a.config.num_hidden_layers == 2
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert not any(p.requires_grad for p in a.parameters())
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_unknown_hub_id_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OfflineError, match=r"'someone/no-such-model' is not available offline.*smollm2-135m"):
        load_backbone("someone/no-such-model")


def test_hf_offline_env_means_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    try:
        assert hub.hub_reachable() is False
    finally:
        hub.hub_reachable.cache_clear()


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model folder"):  # a MissingFileError
        load_backbone(str(tmp_path / "nothing-here"))


def test_local_path_round_trip(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tok = load_backbone(str(tmp_path))
    ids = torch.tensor([tok.encode("Hello there")])
    assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.slow
def test_smollm2_loads_offline_and_knows_paris(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert model.dtype == torch.float32 and not model.training
    assert (next(cache_dir().glob("models/smollm2-135m-*")) / "model.safetensors").exists()
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    paris, london = tokenizer.encode(" Paris")[0], tokenizer.encode(" London")[0]
    assert logits.argmax().item() == paris
    assert logits[paris] > logits[london] + 1.0


@pytest.mark.slow
def test_smollm2_prefers_the_right_option_of_an_easy_question(smollm2):
    from bayes_polar.data.features import FeatureExtractor
    from bayes_polar.data.formats import encode_task, make_loader
    from bayes_polar.data.tasks import Example, Task

    model, tokenizer = smollm2
    easy = Example("What color is the sky on a clear day?", ("green", "blue", "purple", "black"), 1, "sky")
    enc = encode_task(Task("toy", "validation", [easy], 4, tuple("ABCD"), "mem"), tokenizer, "options")
    with torch.no_grad():
        phi = FeatureExtractor(model, "options")(next(iter(make_loader(enc, tokenizer)))).phi
    assert phi[0, :, -2].argmax().item() == 1  # summed option log-likelihood


def test_hub_id_that_the_hub_does_not_have(monkeypatch):
    from transformers import AutoModelForCausalLM

    from bayes_polar.errors import ConfigError

    def from_pretrained(*args, **kwargs):
        raise OSError("someone/typo is not a local folder and is not a valid model identifier\nmore lines")

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ConfigError, match=r"^model 'someone/typo' cannot be loaded from the Hugging Face hub: "
                                          r"someone/typo is not a local folder .*identifier\. Pass a local folder"):
        load_backbone("someone/typo")


def test_a_folder_that_is_not_a_model(tmp_path):
    from bayes_polar.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a model folder that transformers can load"):
        load_backbone(str(tmp_path))
