"""Prompts, answer tokens and per-option sequences, checked against hand-written expectations."""
import pytest
import torch

from bayes_polar.errors import ConfigError, DataFormatError
from bayes_polar.data.formats import (
    Collator,
    answer_token_ids,
    encode_task,
    letters_prompt,
    make_loader,
    option_texts,
)
from bayes_polar.data.tasks import Example, Task, load_task

FEVER = Example(
    question="Which factor will most likely cause a person to develop a fever?",
    choices=("a leg muscle relaxing after exercise", "a bacterial population in the bloodstream",
             "several viral particles on the skin", "carbohydrates being digested in the stomach"),
    label=1, uid="Mercury_7220990",
)


def test_letters_prompt_is_blobs_template():
    assert letters_prompt(FEVER) == (
        "Return the label of the correct answer for the question below.\n\n"
        "Question: Which factor will most likely cause a person to develop a fever?\n"
        "Choices:\n"
        "A) a leg muscle relaxing after exercise\n"
        "B) a bacterial population in the bloodstream\n"
        "C) several viral particles on the skin\n"
        "D) carbohydrates being digested in the stomach\n"
        "Answer:"
    )


def test_boolean_prompt_with_and_without_passage():
    ex = Example("is the sky blue", ("no", "yes"), 1, "0", passage="The sky is blue.")
    assert letters_prompt(ex, "boolean").endswith(
        "Passage: The sky is blue.\nQuestion: is the sky blue\nAnswer (true or false):")
    bare = Example("is the sky blue", ("no", "yes"), 1, "0")
    assert "Passage" not in letters_prompt(bare, "boolean")
    assert option_texts(ex, "boolean")[1] == ("Passage: The sky is blue.\nQuestion: is the sky blue?\nAnswer:", " yes")


def test_option_texts_qa_and_cloze():
    assert option_texts(FEVER)[2] == (
        "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:",
        " several viral particles on the skin",
    )
    wino = Example("Ian ate Dennis's menudo because _ despised intestine.", ("Ian", "Dennis"), 1, "w")
    assert option_texts(wino, "cloze") == [
        ("Ian ate Dennis's menudo because Ian", " despised intestine."),
        ("Ian ate Dennis's menudo because Dennis", " despised intestine."),
    ]


def test_answer_tokens_are_single_smollm2_tokens(tokenizer):
    ids = answer_token_ids(tokenizer, "ABCDE")
    assert ids == [330, 389, 340, 422, 414]
    assert [tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D", " E"]
    assert answer_token_ids(tokenizer, ("False", "True")) == [4178, 3635]
    with pytest.raises(DataFormatError, match="tokens for this tokenizer"):
        answer_token_ids(tokenizer, ["Antidisestablishmentarianism"])


def test_options_encoding_scores_exactly_the_option_tokens(tokenizer):
    task = Task("toy", "train", [FEVER], 5, tuple("ABCDE"), "mem")
    enc = encode_task(task, tokenizer, "options")
    item = enc[0]
    assert len(item.sequences) == 4 and item.num_choices == 4 and item.label == 1
    for (context, continuation), ids, n in zip(option_texts(FEVER), item.sequences, item.continuation_lengths):
        assert tokenizer.decode(ids[-n:]) == continuation
        assert tokenizer.decode(ids[:-n]) == context


def test_truncation_keeps_the_end_and_is_counted(tokenizer):
    long = Example("word " * 400 + "which one?", ("yes", "no"), 0, "long")
    task = Task("toy", "train", [long, FEVER], 5, tuple("ABCDE"), "mem")
    letters = encode_task(task, tokenizer, "letters", max_length=100)
    assert len(letters[0].sequences[0]) == 100 and letters.num_truncated == 1
    assert tokenizer.decode(letters[0].sequences[0]).endswith("B) no\nAnswer:")
    options = encode_task(task, tokenizer, "options", max_length=32)
    assert all(len(s) <= 32 for s in options[0].sequences) and options.num_truncated == 1
    assert tokenizer.decode(options[0].sequences[0][-1:]) == " yes"
    with pytest.raises(ConfigError, match="max_length"):
        encode_task(task, tokenizer, "letters", max_length=0)
    with pytest.raises(ConfigError, match="format must be one of"):
        encode_task(task, tokenizer, "lettres")


def test_collator_left_pads_and_places_options_in_slots(tokenizer):
    three = Example("q?", ("a", "b", "c"), 2, "3")
    task = Task("toy", "train", [FEVER, three], 5, tuple("ABCDE"), "mem")
    enc = encode_task(task, tokenizer, "options")
    batch = next(iter(make_loader(enc, tokenizer, batch_size=2)))
    assert batch.input_ids.shape[0] == 7
    assert batch.slots.tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert batch.choice_mask.tolist() == [[True] * 4 + [False], [True] * 3 + [False] * 2]
    assert batch.labels.tolist() == [1, 2]
    assert (batch.attention_mask[:, -1] == 1).all(), "left padding: every sequence ends at the last column"
    first = enc[0].sequences[0]
    assert batch.input_ids[0, -len(first):].tolist() == first
    assert (batch.input_ids[0, : -len(first)] == tokenizer.pad_token_id).all()


def test_letters_answer_ids_follow_the_task(data_dir, tokenizer):
    boolq = encode_task(load_task("boolq", "validation", data_dir, limit=3), tokenizer, "letters")
    assert [tokenizer.decode([i]) for i in boolq.answer_ids] == [" False", " True"]
    arc = encode_task(load_task("arc_easy", "validation", data_dir, limit=3), tokenizer, "letters")
    assert len(arc.answer_ids) == 5


def test_shuffled_loader_is_seeded(data_dir, tokenizer):
    enc = encode_task(load_task("arc_easy", "validation", data_dir, limit=20), tokenizer, "letters")
    order = lambda seed: torch.cat([b.indices for b in make_loader(enc, tokenizer, 4, shuffle=True, seed=seed)])
    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))


@pytest.mark.parametrize("format", ["options", "letters"])
def test_more_choices_than_the_class_layout_is_a_located_error(tokenizer, format):
    from bayes_polar.data.tasks import Example, Task
    from bayes_polar.errors import DataFormatError

    task = Task("mine", "test", [Example("q", ("a", "b", "c"), None, "q1")], 2, ("A", "B"), "my.jsonl")
    with pytest.raises(DataFormatError, match=r"my.jsonl: question q1 of mine/test has 3 choices, more than"):
        encode_task(task, tokenizer, format)
