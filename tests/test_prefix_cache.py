"""Prefix caching gives the same hidden states, loss and gradients as the full pass."""
import pytest
import torch

from bayes_polar.adapters import inject_polar
from bayes_polar.backbone import tiny_random_llama
from bayes_polar.features import FeatureExtractor, FullTrunk
from bayes_polar.formats import encode_task, make_loader
from bayes_polar.prefix_cache import CachedTrunk, model_fingerprint
from bayes_polar.tasks import Example, Task

EXAMPLES = [
    Example("Which gas do plants absorb from the air?", ("oxygen", "carbon dioxide", "nitrogen"), 1, "a"),
    Example("What is two plus two?", ("four", "five", "three plus one", "six"), 0, "b"),
    Example("Where does the sun rise?", ("in the east", "in the west"), 0, "c"),
]


@pytest.fixture
def adapted():
    model, tokenizer = tiny_random_llama(num_layers=4)
    torch.manual_seed(0)
    inject_polar(model, rank=4, alpha=8, layers=[2, 3])
    with torch.no_grad():  # move Θ off zero so the adapters change the output
        for name, p in model.named_parameters():
            if name.endswith("polar_theta"):
                p.normal_(0, 0.5)
    enc = encode_task(Task("toy", "train", EXAMPLES, 4, tuple("ABCDE"), "mem"), tokenizer, "options")
    return model, tokenizer, enc


def _loss_and_grads(model, extractor, batch):
    phi = extractor(batch).phi
    loss = (phi.pow(2).sum(-1) * batch.choice_mask).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def test_cached_trunk_equals_the_full_pass(adapted):
    model, tokenizer, enc = adapted
    batch = next(iter(make_loader(enc, tokenizer, batch_size=3)))
    full = FullTrunk(model)(batch)
    cached = CachedTrunk(model, 2)
    torch.testing.assert_close(cached(batch)[batch.attention_mask.bool()], full[batch.attention_mask.bool()],
                               atol=1e-5, rtol=1e-5)
    loss_full, grads_full = _loss_and_grads(model, FeatureExtractor(model, "options"), batch)
    loss_cached, grads_cached = _loss_and_grads(model, FeatureExtractor(model, "options", trunk=cached), batch)
    torch.testing.assert_close(loss_cached, loss_full, rtol=1e-5, atol=1e-5)
    assert len(grads_full) == 12  # X, Y, Θ of q_proj and v_proj in two blocks
    for a, b in zip(grads_cached, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lower_blocks_run_once_per_sequence(adapted, monkeypatch):
    model, tokenizer, enc = adapted
    trunk = CachedTrunk(model, 2)
    calls = []
    original = trunk.prefix_states
    monkeypatch.setattr(trunk, "prefix_states", lambda ids, mask: calls.append(len(ids)) or original(ids, mask))
    loader = make_loader(enc, tokenizer, batch_size=2)
    for _ in range(3):
        for batch in loader:
            trunk(batch)
    assert sum(calls) == 9 and len(trunk) == 9, "each of the 9 option sequences once"
    assert [type(b).__name__ for b in trunk.blocks] == ["LlamaDecoderLayer"] * 4, "blocks restored"


def test_padding_does_not_change_cached_states(adapted):
    model, tokenizer, enc = adapted
    trunk = CachedTrunk(model, 2)
    alone = trunk(next(iter(make_loader(enc, tokenizer, batch_size=1))))
    together = trunk(next(iter(make_loader(enc, tokenizer, batch_size=3))))
    n = alone.shape[1]
    torch.testing.assert_close(together[0, -n:], alone[0], atol=1e-5, rtol=1e-5)


def test_save_load_and_half_precision(adapted, tmp_path):
    model, tokenizer, enc = adapted
    batch = next(iter(make_loader(enc, tokenizer, batch_size=3)))
    trunk = CachedTrunk(model, 2)
    reference = trunk(batch)
    path = trunk.save(tmp_path / "cache.safetensors")
    again = CachedTrunk(model, 2)
    assert again.load(path) == len(trunk)
    torch.testing.assert_close(again(batch), reference)
    half = CachedTrunk(model, 2, dtype=torch.float16)
    assert half.nbytes() == 0
    torch.testing.assert_close(half(batch), reference, atol=5e-2, rtol=5e-2)
    assert half.nbytes() * 2 == trunk.nbytes()


def test_start_layer_is_validated_and_fingerprint_tracks_weights(adapted):
    model, _, _ = adapted
    with pytest.raises(ValueError, match="start_layer"):
        CachedTrunk(model, 0)
    key = model_fingerprint(model, 2, torch.float32)
    assert key == model_fingerprint(model, 2, torch.float32) != model_fingerprint(model, 3, torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert model_fingerprint(model, 2, torch.float32) != key
