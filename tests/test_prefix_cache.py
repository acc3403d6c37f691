"""Prefix caching gives the same hidden states, loss and gradients as the full pass."""
import pytest
import torch

from bayes_polar.adapters import inject_polar
from bayes_polar.data.backbone import tiny_random_llama
from bayes_polar.data.features import FeatureExtractor, FullTrunk
from bayes_polar.data.formats import encode_task, make_loader
from bayes_polar.data.prefix_cache import CachedTrunk, common_prefix_length, model_fingerprint
from bayes_polar.data.tasks import Example, Task

EXAMPLES = [
    Example("Which gas do plants absorb from the air?", ("oxygen", "carbon dioxide", "nitrogen"), 1, "a"),
    Example("What is two plus two?", ("four", "five", "three plus one", "six"), 0, "b"),
    Example("Where does the sun rise?", ("in the east", "in the west"), 0, "c"),
]
CLOZE = [  # WinoGrande: the option fills the blank, so the options' contexts differ after the blank
    Example("The trophy did not fit in the suitcase because _ was too big.", ("the trophy", "the suitcase"), 0, "w1"),
    Example("Sam thanked Alex because _ had helped.", ("Sam", "Alex"), 1, "w2"),
]


def _task(examples=EXAMPLES, kind="qa"):
    return Task("toy", "train", examples, 4, tuple("ABCDE"), "mem", kind=kind)


@pytest.fixture
def adapted():
    model, tokenizer = tiny_random_llama(num_layers=4)
    torch.manual_seed(0)
    inject_polar(model, rank=4, alpha=8, layers=[2, 3])
    with torch.no_grad():  # move Θ off zero so the adapters change the output
        for name, p in model.named_parameters():
            if name.endswith("polar_theta"):
                p.normal_(0, 0.5)
    enc = encode_task(_task(), tokenizer, "options")
    return model, tokenizer, enc


def _loss_and_grads(model, extractor, batch):
    phi = extractor(batch).phi
    loss = (phi.pow(2).sum(-1) * batch.choice_mask).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def _assert_states_match_full_pass(trunk, model, batch, atol=1e-5):
    real = batch.attention_mask.bool()
    torch.testing.assert_close(trunk(batch)[real], FullTrunk(model)(batch)[real], atol=atol, rtol=atol)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_cached_trunk_equals_the_full_pass(adapted, share_prefix):
    model, tokenizer, enc = adapted
    batch = next(iter(make_loader(enc, tokenizer, batch_size=3)))
    cached = CachedTrunk(model, 2, share_prefix=share_prefix)
    _assert_states_match_full_pass(cached, model, batch)
    loss_full, grads_full = _loss_and_grads(model, FeatureExtractor(model, "options"), batch)
    loss_cached, grads_cached = _loss_and_grads(model, FeatureExtractor(model, "options", trunk=cached), batch)
    torch.testing.assert_close(loss_cached, loss_full, rtol=1e-5, atol=1e-5)
    assert len(grads_full) == 12  # X, Y, Θ of q_proj and v_proj in two blocks
    for a, b in zip(grads_cached, grads_full):
        # float32: a few ulp of the largest entry (single small entries come from cancellation)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_shared_context_is_exact_in_float64(adapted):
    """Sharing the context changes float rounding only: in float64 it equals the full pass."""
    model, tokenizer, enc = adapted
    model.double()
    batch = next(iter(make_loader(enc, tokenizer, batch_size=3)))
    _assert_states_match_full_pass(CachedTrunk(model, 2, dtype=torch.float64), model, batch, atol=1e-12)


def _spy_lower(trunk, monkeypatch) -> list[tuple[int, int]]:
    """Record the (rows, positions) of every pass through the lower blocks."""
    calls, original = [], trunk._lower
    monkeypatch.setattr(trunk, "_lower", lambda ids, *a, **k: calls.append(tuple(ids.shape)) or original(ids, *a, **k))
    return calls


def test_context_runs_once_per_question_and_sequences_once(adapted, monkeypatch):
    model, tokenizer, enc = adapted
    trunk = CachedTrunk(model, 2)
    calls = _spy_lower(trunk, monkeypatch)
    loader = make_loader(enc, tokenizer, batch_size=2)
    for _ in range(3):
        for batch in loader:
            trunk(batch)
    assert len(trunk) == 9, "each of the 9 option sequences stored once"
    # batch 1: two contexts, then the 3 + 4 continuations; batch 2: one context, 2 continuations; then none
    assert [rows for rows, _ in calls] == [2, 7, 1, 2]
    contexts = [len(item.sequences[0]) - item.continuation_lengths[0] for item in enc.items]
    assert calls[0][1] >= max(contexts[:2]) and calls[1][1] < calls[0][1], "continuations are short"
    assert [type(b).__name__ for b in trunk.blocks] == ["LlamaDecoderLayer"] * 4, "blocks restored"


def test_common_prefix_length_leaves_every_sequence_a_token():
    a, b = torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 9])
    assert common_prefix_length([a, b]) == 2
    assert common_prefix_length([a, a.clone()]) == 3
    assert common_prefix_length([a, torch.tensor([1, 6])]) == 0


def test_cloze_options_share_their_common_tokens(adapted, monkeypatch):
    model, tokenizer, _ = adapted
    enc = encode_task(_task(CLOZE, "cloze"), tokenizer, "options")
    batch = next(iter(make_loader(enc, tokenizer, batch_size=2)))
    trunk = CachedTrunk(model, 2)
    calls = _spy_lower(trunk, monkeypatch)
    _assert_states_match_full_pass(trunk, model, batch)
    assert [rows for rows, _ in calls] == [2, 4], "the sentence start is shared, the rest runs per option"


def test_letters_and_partly_cached_questions(adapted, monkeypatch):
    model, tokenizer, enc = adapted
    letters = encode_task(_task(), tokenizer, "letters")
    batch = next(iter(make_loader(letters, tokenizer, batch_size=3)))
    trunk = CachedTrunk(model, 2)
    calls = _spy_lower(trunk, monkeypatch)
    _assert_states_match_full_pass(trunk, model, batch)
    assert calls == [tuple(batch.input_ids.shape)], "one sequence per question: one padded pass"

    batch = next(iter(make_loader(enc, tokenizer, batch_size=3)))
    trunk(batch)
    for key in list(trunk.store)[-3:]:  # the 3 newest: 1 option of question 2 and both of question 3
        del trunk.store[key]
    calls.clear()
    _assert_states_match_full_pass(trunk, model, batch)
    assert sorted(rows for rows, _ in calls) == [1, 1, 2], "shared pair + the lone option"


def test_padding_does_not_change_cached_states(adapted):
    model, tokenizer, enc = adapted
    trunk = CachedTrunk(model, 2)
    alone = trunk(next(iter(make_loader(enc, tokenizer, batch_size=1))))
    together = trunk(next(iter(make_loader(enc, tokenizer, batch_size=3))))
    n = alone.shape[1]
    torch.testing.assert_close(together[0, -n:], alone[0], atol=1e-5, rtol=1e-5)


def _varied_task(n=12, kind="qa"):
    """Questions and options of many lengths (what makes padding matter)."""
    words = "the a plant sun water rock gas heat moves light cell energy earth moon".split()
    examples = []
    for q in range(n):
        question = " ".join(words[(q * 5 + j) % len(words)] for j in range(3 + (q * 7) % 11)) + "?"
        choices = tuple(" ".join(words[(q + c + j) % len(words)] for j in range(1 + (q * c + 3 * c) % 6))
                        for c in range(2 + q % 3))
        examples.append(Example(question, choices, q % len(choices), f"v{q}"))
    return Task("varied", "train", examples, 4, tuple("ABCDE"), "mem", kind=kind)


@pytest.mark.parametrize("format", ["options", "letters"])
def test_length_sorted_fill_pads_less_and_stores_the_same_states(adapted, monkeypatch, format):
    """``warm_task`` (length-bucketed order) vs ``warm`` over the loader's order: same keys, states equal
    in float64 to 1e-12 (padding only changes float rounding), fewer padded positions."""
    model, tokenizer, _ = adapted
    model.double()
    enc = encode_task(_varied_task(), tokenizer, format)
    plain, bucketed = CachedTrunk(model, 2, dtype=torch.float64), CachedTrunk(model, 2, dtype=torch.float64)
    plain_calls, bucketed_calls = _spy_lower(plain, monkeypatch), _spy_lower(bucketed, monkeypatch)
    assert plain.warm(make_loader(enc, tokenizer, batch_size=4)) == bucketed.warm_task(enc, tokenizer, 4) >= 12
    assert set(plain.store) == set(bucketed.store)
    for key, states in plain.store.items():
        torch.testing.assert_close(bucketed.store[key], states, atol=1e-12, rtol=1e-12)
    executed = [sum(rows * width for rows, width in calls) for calls in (plain_calls, bucketed_calls)]
    assert executed[1] < executed[0], executed
    order = bucketed.fill_order(enc, 4)
    assert sorted(order) == list(range(len(enc))) and order == bucketed.fill_order(enc, 4)
    if format == "letters":  # one pass per batch: fewer than FILL_CHUNK_BATCHES batches is one sorted chunk
        lengths = [len(enc.items[i].sequences[0]) for i in order]
        assert lengths == sorted(lengths)


def test_length_sorted_fill_in_float32_matches_to_rounding(adapted):
    model, tokenizer, _ = adapted
    enc = encode_task(_varied_task(), tokenizer, "options")
    plain, bucketed = CachedTrunk(model, 2), CachedTrunk(model, 2)
    plain.warm(make_loader(enc, tokenizer, batch_size=4))
    bucketed.warm_task(enc, tokenizer, 4)
    for key, states in plain.store.items():
        torch.testing.assert_close(bucketed.store[key], states, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("options, cached", [([], True), (["--prefix-cache", "false"], False),
                                             (["--layers", "all"], False)])
def test_prefix_cache_is_the_cli_default_when_lower_blocks_are_frozen(data_dir, options, cached):
    from bayes_polar.cli import _config, build_parser
    from bayes_polar.run import build_pipeline

    args = build_parser().parse_args(["fit", "--out", "unused", "--model", "tiny-random-llama", "--layers=-1",
                                      "--train-limit", "4", "--threads", "1", *options])
    pipe = build_pipeline(_config(args), data_dir)
    assert isinstance(pipe.method.extractor.trunk, CachedTrunk) is cached
