"""Answer formats: how a question becomes token ids, and which features the head sees.

``letters`` (the paper's protocol, BLoB's prompt): one prompt lists the choices as ``A) ...``;
φ is the final hidden state at the last prompt token; class logits ``W φ`` with one row of W per
answer word (initialisable from the LM head rows of `` A``, `` B``, ...). Lettered tasks all
use A-E, so a head trained on a 4-choice task also scores 5-choice questions.

``options`` (per-option scoring): one sequence per choice, ``context + continuation``;
φ_c is the final hidden state at the last token of sequence c, optionally extended by the LM's
own log-likelihood of the continuation (sum and per-token mean); logits ``w·φ_c`` with one
shared w, so questions with 3, 4 or 5 options share one head.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..errors import BayesPolarWarning, ConfigError, DataFormatError
from .tasks import LETTERS, Example, Task

FORMATS = ("letters", "options")

LETTERS_TEMPLATE = (
    "Return the label of the correct answer for the question below.\n\n"
    "{passage}Question: {question}\nChoices:\n{choices}\nAnswer:"
)
BOOLEAN_TEMPLATE = (
    "Read the passage below and answer the question with the words 'true' or 'false'.\n\n"
    "{passage}Question: {question}\nAnswer (true or false):"
)
OPTION_CONTEXT = "{passage}Question: {question}\nAnswer:"
BOOLEAN_OPTION_CONTEXT = "{passage}Question: {question}?\nAnswer:"


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {name!r}")
    return name


def _passage(example: Example) -> str:
    return f"Passage: {example.passage}\n" if example.passage else ""


def letters_prompt(example: Example, kind: str = "qa") -> str:
    """The one prompt of the letters format (BLoB's template; BoolQ's true/false variant)."""
    if kind == "boolean":
        return BOOLEAN_TEMPLATE.format(passage=_passage(example), question=example.question)
    choices = "\n".join(f"{LETTERS[i]}) {text}" for i, text in enumerate(example.choices))
    return LETTERS_TEMPLATE.format(passage=_passage(example), question=example.question, choices=choices)


def option_texts(example: Example, kind: str = "qa") -> list[tuple[str, str]]:
    """``(context, continuation)`` per choice; the LM log-likelihood is read on the continuation.

    WinoGrande (``cloze``) uses partial scoring: the option fills the blank in the context and the
    rest of the sentence is the shared continuation.
    """
    if kind == "cloze":
        head, _, tail = example.question.partition("_")
        tail = tail.strip()
        if tail:
            return [(head + choice, " " + tail) for choice in example.choices]
        return [(head.rstrip(), " " + choice) for choice in example.choices]
    if kind == "boolean":
        context = BOOLEAN_OPTION_CONTEXT.format(passage=_passage(example), question=example.question.rstrip("?"))
    else:
        context = OPTION_CONTEXT.format(passage=_passage(example), question=example.question)
    return [(context, " " + choice) for choice in example.choices]


def answer_token_ids(tokenizer, words) -> list[int]:
    """Token id of `` word`` for each answer word; each must be a single token."""
    ids = []
    for word in words:
        tokens = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(tokens) != 1:
            raise DataFormatError(f"answer word {' ' + word!r} is {len(tokens)} tokens for this tokenizer; need 1")
        ids.append(tokens[0])
    return ids


@dataclass
class EncodedExample:
    """Token ids of one question: one sequence (letters) or one per choice (options)."""

    sequences: list[list[int]]
    continuation_lengths: list[int]  # tokens scored for the LM log-likelihood (options only)
    label: int | None  # None: unknown (prediction only)
    num_choices: int
    truncated: bool = False


@dataclass
class EncodedTask:
    """A task tokenised in one format; a ``torch.utils.data.Dataset`` of :class:`EncodedExample`."""

    task: Task
    format: str
    items: list[EncodedExample]
    num_classes: int
    max_length: int
    answer_ids: list[int] = field(default_factory=list)  # letters: token ids of the answer words

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.items[index]

    @property
    def num_truncated(self) -> int:
        return sum(item.truncated for item in self.items)


def encode_task(task: Task, tokenizer, format: str = "options", max_length: int = 512) -> EncodedTask:
    """Tokenise every example of ``task`` in ``format``.

    Truncation policy: prompts longer than ``max_length`` tokens lose tokens from the left (the
    question's start, or a BoolQ passage's; the end with ``Answer:`` and the option text are
    kept). ``num_truncated`` counts the questions affected and a :class:`BayesPolarWarning` says
    how many; runs report the count in metrics.json (``train.truncated``, ``evaluations.*.truncated``).
    """
    check_format(format)
    if max_length < 8:
        raise ConfigError(f"Expected max_length >= 8 but got {max_length}")
    _check_choice_counts(task, format)
    encode = _encode_letters if format == "letters" else _encode_options
    items = [encode(example, task.kind, tokenizer, max_length) for example in task.examples]
    truncated = sum(item.truncated for item in items)
    if truncated:
        warnings.warn(f"{task.name}/{task.split}: {truncated} of {len(items)} prompts are longer than "
                      f"max_length={max_length} tokens and lose tokens from the left", BayesPolarWarning,
                      stacklevel=2)
    if format == "letters":  # one class per answer word (A-E), whatever the question's choice count
        answer_ids = answer_token_ids(tokenizer, task.answer_words)
        return EncodedTask(task, format, items, len(task.answer_words), max_length, answer_ids)
    return EncodedTask(task, format, items, task.num_classes, max_length, [])


def _check_choice_counts(task: Task, format: str) -> None:
    """Every question fits the task's class layout: no more choices than ``num_classes`` (options) or
    answer words (letters); a question that does not is named."""
    room, what = ((len(task.answer_words), "answer words") if format == "letters" and task.kind != "boolean"
                  else (task.num_classes, "num_classes"))
    for i, example in enumerate(task.examples):
        if len(example.choices) > room:
            raise DataFormatError(f"{task.source}: question {example.uid or i} of {task.name}/{task.split} has "
                                  f"{len(example.choices)} choices, more than the task's {room} {what}")


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _encode_letters(example: Example, kind: str, tokenizer, max_length: int) -> EncodedExample:
    ids = _tokens(tokenizer, letters_prompt(example, kind))
    truncated = len(ids) > max_length
    return EncodedExample([ids[-max_length:]], [0], example.label, len(example.choices), truncated)


def _encode_options(example: Example, kind: str, tokenizer, max_length: int) -> EncodedExample:
    sequences, lengths, truncated = [], [], False
    for context, continuation in option_texts(example, kind):
        context_ids, continuation_ids = _tokens(tokenizer, context), _tokens(tokenizer, continuation)
        continuation_ids = continuation_ids[: max_length - 1]
        keep = max_length - len(continuation_ids)
        truncated |= len(context_ids) > keep
        sequences.append(context_ids[-keep:] + continuation_ids)
        lengths.append(len(continuation_ids))
    return EncodedExample(sequences, lengths, example.label, len(example.choices), truncated)


@dataclass
class Batch:
    """A padded batch. ``input_ids``/``attention_mask`` are (S, L) with left padding, where
    S = B (letters) or the number of option sequences (options); ``slots`` (S,) says which
    (question, choice) cell of the (B, C) grid each sequence fills."""

    input_ids: torch.Tensor  # (S, L)
    attention_mask: torch.Tensor  # (S, L)
    labels: torch.Tensor  # (B,); -1 where the answer is unknown
    choice_mask: torch.Tensor  # (B, C) bool: which choices exist
    slots: torch.Tensor  # (S,) flat index into (B, C)
    continuation_lengths: torch.Tensor  # (S,)
    indices: torch.Tensor  # (B,) positions of the examples in their EncodedTask

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "Batch":
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


class Collator:
    """``collate_fn`` for a DataLoader over ``(index, EncodedExample)`` pairs."""

    def __init__(self, pad_token_id: int, num_classes: int, per_option: bool):
        self.pad_token_id = pad_token_id
        self.num_classes = num_classes
        self.per_option = per_option

    def __call__(self, pairs) -> Batch:
        indices, items = zip(*pairs)
        num_classes = self.num_classes
        sequences, slots, lengths = [], [], []
        for b, item in enumerate(items):
            for c, (ids, n) in enumerate(zip(item.sequences, item.continuation_lengths)):
                sequences.append(ids)
                slots.append(b * num_classes + c)
                lengths.append(n)
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for s, ids in enumerate(sequences):
            input_ids[s, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[s, width - len(ids):] = 1
        choice_mask = torch.zeros((len(items), num_classes), dtype=torch.bool)
        for b, item in enumerate(items):
            choice_mask[b, : item.num_choices] = True
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=torch.tensor([-1 if item.label is None else item.label for item in items], dtype=torch.long),
            choice_mask=choice_mask,
            slots=torch.tensor(slots, dtype=torch.long),
            continuation_lengths=torch.tensor(lengths, dtype=torch.long),
            indices=torch.tensor(indices, dtype=torch.long),
        )


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, encoded: EncodedTask):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int):
        return index, self.encoded[index]


def make_loader(encoded: EncodedTask, tokenizer, batch_size: int = 8, shuffle: bool = False,
                seed: int = 0, sampler=None) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`Batch` es; ``shuffle`` uses its own seeded generator.

    The loader always owns a generator, so creating an iterator never draws from the global
    torch RNG (which would shift Monte Carlo draws and break exact resumption).
    """
    generator = torch.Generator().manual_seed(seed)
    collate = Collator(tokenizer.pad_token_id, encoded.num_classes, encoded.format == "options")
    return torch.utils.data.DataLoader(
        _Indexed(encoded), batch_size=batch_size, shuffle=shuffle and sampler is None,
        generator=generator, sampler=sampler, collate_fn=collate,
    )
