"""Tasks from the user's own files: one generic schema for JSONL and CSV.

A row (a JSON object per line, or a CSV row under a header) has

==========  ========================================================================================
question    the question (string)
choices     the answer texts, 2 to 26 (a JSON list; in CSV a cell holding a JSON list)
answer      the right choice: its 0-based index or its text (optional: rows without one can be
            predicted, not trained or scored)
context     optional passage, shown before the question
id          optional identifier (default: ``<file>:<line>``)
==========  ========================================================================================

``--task my.jsonl`` (or ``load_task("my.jsonl", split)``) reads one file, whatever split is asked
for; a folder holds ``train``, ``validation`` and/or ``test`` files (``.jsonl`` or ``.csv``).
:func:`register_task` names a task whose files use other field names. Bad rows raise
:class:`~bayes_polar.errors.DataFormatError` naming the file, the line and the field.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataFormatError, MissingFileError

SUFFIXES = (".jsonl", ".csv")
SPLITS = ("train", "validation", "test")
FIELDS = ("question", "choices", "answer", "context", "id")
MAX_CHOICES = 26


@dataclass(frozen=True)
class UserTaskSpec:
    """Where a user's task lives (split -> file) and which of its columns hold the schema's fields.

    ``fields`` maps a schema field to the file's column; ``choices`` may also be a list of columns
    (one choice each; empty cells are skipped, so questions may have unequal choice counts).
    """

    name: str
    files: dict[str, Path]
    fields: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    single_file: bool = False

    def column(self, name: str):
        return self.fields.get(name, name)


REGISTERED: dict[str, UserTaskSpec] = {}


def is_task_path(name) -> bool:
    """Whether ``name`` names a file or folder of the user's (not a registered task name)."""
    text = str(name)
    return text.endswith(SUFFIXES) or Path(text).expanduser().is_dir()


def user_task_spec(name) -> UserTaskSpec | None:
    """The spec of a registered name or of a path; None for other names (the built-in tasks)."""
    text = str(name)
    if text in REGISTERED:
        return REGISTERED[text]
    if is_task_path(text):
        return _spec_from_path(text, text, {})
    return None


def register_task(name: str, data, fields: dict | None = None) -> UserTaskSpec:
    """Name a task of your own files, with its column names if they differ from the schema's.

    Parameters
    ----------
    name: the task name to use in ``FitConfig(task=...)``, ``--task`` (same process) and ``load_task``.
    data: a ``.jsonl``/``.csv`` file, a folder of ``train``/``validation``/``test`` files, or a
        dict ``{split: file}``.
    fields: ``{schema field: column}``, e.g. ``{"question": "prompt", "choices": ["a", "b", "c"],
        "answer": "gold"}``.

    Usage::

        register_task("pets", "data/pets.csv", fields={"question": "q", "choices": ["opt1", "opt2", "opt3"]})
        load_task("pets", "train")
    """
    from .tasks import TASKS

    if name in TASKS:
        raise ConfigError(f"{name!r} is a built-in task; register your task under another name")
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ConfigError(f"fields {unknown} are not in the schema; its fields: {', '.join(FIELDS)}")
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else str(v) for k, v in fields.items()}
    if isinstance(data, dict):
        files = {str(split): Path(path).expanduser() for split, path in data.items()}
        for path in files.values():
            _check_file(path)
        spec = UserTaskSpec(name, files, fields)
    else:
        spec = _spec_from_path(name, data, fields)
        for path in set(spec.files.values()):
            _check_file(path)
    REGISTERED[name] = spec
    return spec


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise MissingFileError(f"No data file at {path}")
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"{path}: expected a .jsonl or .csv file")


def _spec_from_path(name: str, data, fields: dict) -> UserTaskSpec:
    path = Path(data).expanduser()
    if path.is_dir():
        files = {split: candidate for split in SPLITS for candidate in (path / f"{split}{s}" for s in SUFFIXES)
                 if candidate.is_file()}
        if not files:
            raise MissingFileError(f"{path} holds none of {', '.join(f'{s}.jsonl/.csv' for s in SPLITS)}")
        return UserTaskSpec(name, files, fields)
    return UserTaskSpec(name, {split: path for split in SPLITS}, fields, single_file=True)  # read (checked) later


def load_user_task(spec: UserTaskSpec, split: str, limit: int | None = None):
    """One split of a user's task as a :class:`~bayes_polar.data.tasks.Task` (rows validated, located)."""
    from .tasks import LETTERS, Task

    if split not in spec.files:
        raise DataFormatError(f"Task {spec.name!r} has no split {split!r}; its splits: {', '.join(spec.files)}")
    path = spec.files[split]
    _check_file(path)
    rows = _csv_rows(path) if path.suffix == ".csv" else _jsonl_rows(path)
    if not rows:
        raise DataFormatError(f"{path}: split {split!r} of task {spec.name!r} is empty (no rows)")
    rows = rows if limit is None else rows[:limit]
    examples = []
    for where, row in rows:
        try:
            examples.append(parse_row(spec, row, default_id=f"{path.name}:{where}"))
        except (KeyError, ValueError, TypeError) as exc:
            message = exc.args[0] if exc.args else repr(exc)
            raise DataFormatError(f"{path}:{where}: {message}") from None
    if split == "train":
        for (where, _), example in zip(rows, examples):
            if example.label is None:
                raise DataFormatError(f"{path}:{where}: field 'answer' is missing; training questions need one")
    num_classes = max(len(e.choices) for e in examples)
    return Task(spec.name, split, examples, num_classes, tuple(LETTERS[:num_classes]), str(path))


def parse_row(spec: UserTaskSpec | None, row: dict, default_id: str = ""):
    """One :class:`~bayes_polar.data.tasks.Example` from a row of the generic schema (after ``spec.fields``)."""
    from .tasks import Example

    spec = spec or UserTaskSpec("", {})
    question = _text(row, spec.column("question"), "question", required=True)
    choices = _choices(row, spec.column("choices"))
    answer_column = spec.column("answer")
    label = _label(row.get(answer_column), choices, answer_column)
    context = _text(row, spec.column("context"), "context", required=False)
    uid = row.get(spec.column("id"))
    return Example(question=question, choices=tuple(choices), label=label,
                   uid=str(uid) if uid not in (None, "") else default_id, passage=context or None)


def _text(row: dict, column: str, name: str, required: bool) -> str | None:
    value = row.get(column)
    if value is None or value == "":
        if required:
            raise KeyError(f"missing field {column!r}" + (f" ({name})" if column != name else ""))
        return None
    if not isinstance(value, str):
        raise TypeError(f"field {column!r} must be a string, got {type(value).__name__} {json.dumps(value)[:60]}")
    return value


def _choices(row: dict, column) -> list[str]:
    if isinstance(column, tuple):  # one column per choice; empty cells skipped
        values = [row.get(c) for c in column if row.get(c) not in (None, "")]
        name = "choices (" + ", ".join(column) + ")"
    else:
        values, name = row.get(column), repr(column)
        if values is None:
            raise KeyError(f"missing field {column!r}")
        if isinstance(values, str):  # a CSV cell holding a JSON list
            try:
                values = json.loads(values)
            except json.JSONDecodeError:
                raise ValueError(f"field {column!r} must be a JSON list of strings, got {values[:60]!r}") from None
    if not isinstance(values, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise TypeError(f"field {name} must be a list of strings, got {type(values).__name__} "
                        f"{json.dumps(values, default=str)[:60]}")
    values = [str(v) for v in values]
    if not 2 <= len(values) <= MAX_CHOICES:
        raise ValueError(f"field {name} must have 2 to {MAX_CHOICES} choices, got {len(values)}")
    return values


def _label(answer, choices: list[str], column: str) -> int | None:
    """The 0-based index of ``answer``: an integer index, the text of a choice, or a string of digits."""
    if answer is None or answer == "":
        return None
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise TypeError(f"field {column!r} must be a choice index or a choice text, got "
                        f"{type(answer).__name__} {json.dumps(answer, default=str)[:60]}")
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        if not answer.strip().isdigit():
            raise ValueError(f"field {column!r} {answer!r} is neither one of the choices {choices} nor an index")
        answer = int(answer)
    if not 0 <= answer < len(choices):
        raise ValueError(f"field {column!r} index {answer} is out of range for {len(choices)} choices "
                         f"(0-based: 0 to {len(choices) - 1})")
    return answer


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    from .tasks import _json_records

    return [(f"line {line}", row) for line, row in _json_records(path)]


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    """Rows of a CSV file with a header, each with its line number; ragged rows are located."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return []
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DataFormatError(f"{path}:line {reader.line_num}: expected {len(header)} comma-separated "
                                          f"fields ({', '.join(header)}), got {len(fields)}")
                rows.append((f"line {reader.line_num}", dict(zip(header, fields))))
        except csv.Error as exc:
            raise DataFormatError(f"{path}:line {reader.line_num}: not valid CSV ({exc})") from None
    return rows
