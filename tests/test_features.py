"""Features equal what the full causal LM computes, with and without left padding."""
import pytest
import torch
import torch.nn.functional as F

from bayes_polar.data.features import FeatureExtractor, answer_head_rows, extract_features, position_ids_from_mask
from bayes_polar.data.formats import encode_task, make_loader
from bayes_polar.data.tasks import Example, Task
from bayes_polar.errors import UnsupportedArchitectureError

EXAMPLES = [
    Example("Which gas do plants absorb from the air?", ("oxygen", "carbon dioxide", "nitrogen"), 1, "a"),
    Example("What is two plus two?", ("four", "five", "three plus one is also right", "six", "zero"), 0, "b"),
]
TASK = Task("toy", "validation", EXAMPLES, 5, tuple("ABCDE"), "mem")


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_letters_features_reproduce_the_lm_logits(tiny_llama):
    model, tokenizer = tiny_llama
    enc = encode_task(TASK, tokenizer, "letters")
    batch = next(iter(make_loader(enc, tokenizer, batch_size=2)))
    features = FeatureExtractor(model, "letters")(batch)
    assert features.phi.shape == (2, 1, 32) and features.phi.dtype == torch.float32
    logits = features.phi[:, 0] @ answer_head_rows(model, enc.answer_ids).T
    for b, item in enumerate(enc.items):  # each prompt alone, unpadded
        ids = torch.tensor([item.sequences[0]])
        full = model(ids).logits[0, -1, enc.answer_ids]
        torch.testing.assert_close(logits[b], full, atol=1e-5, rtol=1e-5)


def test_letters_head_rows_refuse_an_lm_head_with_a_bias(tiny_llama):
    model, _ = tiny_llama
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))  # as Phi-2's lm_head has
    try:
        with pytest.raises(UnsupportedArchitectureError, match="format='options'"):
            answer_head_rows(model, [1, 2])
    finally:
        head.bias = None


def test_option_loglik_matches_the_lm(tiny_llama):
    model, tokenizer = tiny_llama
    enc = encode_task(TASK, tokenizer, "options")
    batch = next(iter(make_loader(enc, tokenizer, batch_size=2)))
    raw = FeatureExtractor(model, "options").raw(batch)
    phi, mask, labels = raw.phi, raw.mask, batch.labels
    assert phi.shape == (2, 5, 34) and mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert labels.tolist() == [1, 0]
    assert torch.equal(phi[0, 3:], torch.zeros(2, 34)), "missing options stay zero"
    for b, item in enumerate(enc.items):
        for c, (ids, n) in enumerate(zip(item.sequences, item.continuation_lengths)):
            logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            expected = sum(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]] for j in range(n))
            torch.testing.assert_close(phi[b, c, -2], expected, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(phi[b, c, -1], expected / n, atol=1e-4, rtol=1e-5)


def test_loglik_features_can_be_switched_off(tiny_llama):
    model, tokenizer = tiny_llama
    extractor = FeatureExtractor(model, "options", loglik_features=False)
    enc = encode_task(TASK, tokenizer, "options")
    assert extractor(next(iter(make_loader(enc, tokenizer)))).phi.shape[-1] == extractor.feature_dim == 32


def test_the_head_sees_options_centred_within_each_question_and_scaled(tiny_llama):
    from bayes_polar.data.normalization import FeatureScaling

    model, tokenizer = tiny_llama
    enc = encode_task(TASK, tokenizer, "options")
    batch = next(iter(make_loader(enc, tokenizer, batch_size=2)))
    extractor = FeatureExtractor(model, "options")
    raw, centred = extractor.raw(batch), extractor(batch)
    valid = centred.mask.unsqueeze(-1).float()
    torch.testing.assert_close((centred.phi * valid).sum(1), torch.zeros(2, 34), atol=1e-4, rtol=0)
    assert torch.equal(centred.phi[0, 3:], torch.zeros(2, 34)), "missing options stay zero"
    differences = raw.phi[:, :1] - raw.phi  # what the softmax sees is kept
    torch.testing.assert_close((centred.phi[:, :1] - centred.phi)[centred.mask], differences[raw.mask])
    extractor.scaling = FeatureScaling(torch.linspace(0.5, 4.0, 34))
    torch.testing.assert_close(extractor(batch).phi, centred.phi / extractor.scaling.scale)
