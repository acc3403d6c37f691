"""What a run needs to predict without its training data: ``layout.json`` and ``zero_shot.safetensors``.

``layout.json`` records the answer format, the class layout (classes, answer words and their token
ids), the training task's kind and size, the prompt length and the backbone and tokenizer
reference (with the sizes checked on reload); ``zero_shot.safetensors`` the zero-shot head.
Adapters, the last layer and any feature normalisation are the run's other artifacts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ArtifactError, ConfigError

LAYOUT_FILE = "layout.json"
ZERO_SHOT_FILE = "zero_shot.safetensors"
FILES = (LAYOUT_FILE, ZERO_SHOT_FILE)  # in the run's sha256 manifest (runs since they were added to it)
VERSION = 1


@dataclass(frozen=True)
class RunLayout:
    format: str
    task: str
    kind: str
    num_classes: int
    answer_words: tuple[str, ...]
    answer_ids: tuple[int, ...]
    train_examples: int
    max_length: int
    backbone: str
    backbone_class: str
    vocab_size: int
    hidden_size: int
    where: str = LAYOUT_FILE  # the file it was read from (for messages; not saved)

    @classmethod
    def of(cls, pipe) -> "RunLayout":
        model, train = pipe.model, pipe.train
        from .adapters.modules import unwrap

        base = unwrap(model)
        return cls(format=train.format, task=train.task.name, kind=train.task.kind, num_classes=train.num_classes,
                   answer_words=tuple(train.task.answer_words), answer_ids=tuple(train.answer_ids),
                   train_examples=len(train), max_length=train.max_length, backbone=pipe.config.model,
                   backbone_class=type(base).__name__, vocab_size=int(base.config.vocab_size),
                   hidden_size=int(base.config.hidden_size))

    def empty_train(self):
        """An EncodedTask with the training split's layout and no questions."""
        from .data.formats import EncodedTask
        from .data.tasks import Task

        task = Task(self.task, "train", [], self.num_classes, self.answer_words, LAYOUT_FILE, kind=self.kind)
        return EncodedTask(task, self.format, [], self.num_classes, self.max_length, list(self.answer_ids))

    def check_backbone(self, model, tokenizer) -> None:
        """The backbone and tokenizer are the ones the run was trained on (sizes and answer token ids)."""
        from .adapters.modules import unwrap
        from .data.formats import answer_token_ids

        base = unwrap(model)
        found = (type(base).__name__, int(base.config.vocab_size), int(base.config.hidden_size))
        if found != (self.backbone_class, self.vocab_size, self.hidden_size):
            raise ConfigError(f"{self.where}: the run was trained on {self.backbone!r} ({self.backbone_class}, vocabulary "
                              f"{self.vocab_size}, hidden size {self.hidden_size}); the backbone loaded now is "
                              f"{found[0]}, vocabulary {found[1]}, hidden size {found[2]}")
        if self.format == "letters" and tuple(answer_token_ids(tokenizer, self.answer_words)) != self.answer_ids:
            raise ConfigError(f"{self.where}: the tokenizer maps the answer words {self.answer_words} to other token ids "
                              f"than the run's {self.answer_ids}")

    def save(self, run_dir: Path, zero_shot: torch.Tensor) -> None:
        """Both files, each written atomically (the caller lists them in the run's sha256 manifest)."""
        from safetensors.torch import save

        from .training.checkpoint import atomic_write_bytes, atomic_write_json

        values = {k: v for k, v in self.__dict__.items() if k != "where"}
        atomic_write_json(run_dir / LAYOUT_FILE, {"version": VERSION, **values, "answer_words": list(self.answer_words),
                                                  "answer_ids": list(self.answer_ids)})
        atomic_write_bytes(run_dir / ZERO_SHOT_FILE, save({"weight": zero_shot.contiguous()}))

    @classmethod
    def load(cls, run_dir: Path) -> tuple["RunLayout", torch.Tensor] | None:
        """The layout and zero-shot head of ``run_dir``, or None for runs written before they existed."""
        from safetensors.torch import load_file

        path = run_dir / LAYOUT_FILE
        if not path.exists():
            return None
        try:
            values = json.loads(path.read_text())
            values.pop("version")
            layout = cls(**{**values, "answer_words": tuple(values["answer_words"]),
                            "answer_ids": tuple(values["answer_ids"]), "where": str(path)})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"Cannot read the run layout {path}: {exc}") from None
        try:
            return layout, load_file(run_dir / ZERO_SHOT_FILE)["weight"]
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a bad header
            raise ArtifactError(f"{run_dir / ZERO_SHOT_FILE} does not hold a zero-shot head ({exc}); fit the run "
                                "again") from None
