"""Real multiple-choice benchmarks as lists of :class:`Example`, from local files or the hub.

``load_task(name, split, data_dir=None)`` reads the local mirror (``data_dir``, else
``$BAYES_POLAR_DATA``) through ``datasets.load_dataset("json" | "csv", data_files=...)``, or the
Hugging Face hub id when no local folder is given; splits the mirror lacks (the ARC and
OpenBookQA test splits, most MMLU subjects) come from the hub. Every row is validated: a malformed
row raises :class:`~bayes_polar.errors.DataFormatError` naming the file, the line and the field.
``name`` may also be the user's own file or folder, or a task named by ``register_task``
(:mod:`bayes_polar.data.user_tasks`).

Every split ``S`` also has two derived splits for choosing hyperparameters without touching the
reported ones: ``S-heldout``, its last ``HELDOUT_FRACTION`` (10 %) of questions (the slice temperature
scaling fits T on), and ``S-fit``, the rest. ``train-fit`` / ``train-heldout`` are the tuning
protocol's training and dev splits (see ``benchmarks/results/smollm2_table``).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import BayesPolarWarning, DataFormatError, MissingFileError, UnknownTaskError
from .hub import require_hub

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DATA_ENV = "BAYES_POLAR_DATA"
HELDOUT_FRACTION = 0.1  # S-heldout: the last 10 % of split S (temperature scaling's slice, the protocol's dev split)
DERIVED_SPLITS = ("fit", "heldout")


@dataclass(frozen=True)
class Example:
    """One multiple-choice question.

    ``question`` is the question (ARC, OBQA, MMLU, BoolQ) or the sentence with a blank ``_``
    (WinoGrande); ``choices`` the answer texts in order; ``label`` the index of the right one
    (None when unknown: such questions can be predicted, not trained on or scored); ``passage``
    the BoolQ passage or a user's context when there is one; ``uid`` a stable identifier.
    """

    question: str
    choices: tuple[str, ...]
    label: int | None
    uid: str
    passage: str | None = None


@dataclass
class Task:
    """A split of a task: its examples and what the answer format needs to know."""

    name: str
    split: str
    examples: list[Example]
    num_classes: int  # the most choices any question of this task can have
    answer_words: tuple[str, ...]  # what the letters format asks the LM to say (one head row each)
    source: str  # file or hub id
    dropped: int = 0  # rows skipped (reported, never silent)
    kind: str = "qa"  # "qa", "cloze" (WinoGrande's blank) or "boolean"

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.examples]


Row = dict
Parser = Callable[[Row], Example]


@dataclass(frozen=True)
class TaskSpec:
    """Where a task lives and how its rows become :class:`Example` s."""

    hub_id: str
    hub_config: str | None
    folder: str
    files: dict[str, str]  # split -> local file name
    parse: Parser
    num_classes: int
    answer_words: tuple[str, ...] = tuple(LETTERS[:5])
    hub_splits: dict[str, str] = field(default_factory=dict)  # split -> hub split name
    csv_columns: tuple[str, ...] | None = None
    kind: str = "qa"
    hub_fallback: tuple[str, ...] = ()  # splits read from the hub when the local mirror lacks their file
    default_split: str = "validation"  # the split evaluated by default


def _need(row: Row, key: str, kind: type | tuple[type, ...] | None = None):
    """``row[key]``, or an error that the caller turns into a located DataFormatError.

    ``kind``: the expected type(s); a value of another type is an error naming the field.
    """
    value = row.get(key)
    if value is None:
        raise KeyError(f"missing field {key!r}")
    if kind is not None and not isinstance(value, kind):
        kinds = (kind,) if isinstance(kind, type) else kind
        expected = " or ".join(_JSON_NAMES.get(k.__name__, k.__name__) for k in kinds)
        raise TypeError(f"field {key!r} must be a {expected}, got {_json_value(value)}")
    return value


_JSON_NAMES = {"dict": "JSON object", "str": "string", "int": "integer", "list": "list"}


def _json_value(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, list, dict)) else repr(value)
    return f"{type(value).__name__} {text[:60]}"


def _strings(field: str, values) -> list[str]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (str, int)) for v in values):
        raise TypeError(f"field {field!r} must be a list of strings, got {_json_value(values)}")
    return [str(v) for v in values]


def _parse_arc(row: Row, stem: str = "question") -> Example:
    choices = _need(row, "choices", dict)
    texts = _strings("choices.text", _need(choices, "text"))
    keys = _strings("choices.label", _need(choices, "label"))
    if len(texts) != len(keys) or len(texts) < 2:
        raise ValueError(f"choices must have as many texts as labels (>= 2), got {len(texts)} and {len(keys)}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"choice labels {list(keys)} repeat a label, so answerKey cannot say which choice is right")
    answer = str(_need(row, "answerKey", (str, int)))
    if answer not in keys:
        raise ValueError(f"answerKey {answer!r} is not one of the choice labels {list(keys)}")
    return Example(
        question=str(_need(row, stem, str)),
        choices=tuple(texts),
        label=list(keys).index(answer),
        uid=str(row.get("id", "")),
    )


def _parse_obqa(row: Row) -> Example:
    return _parse_arc(row, stem="question_stem")


def _parse_winogrande(row: Row) -> Example:
    sentence = _need(row, "sentence", str)
    if "_" not in sentence:
        raise ValueError("sentence has no blank '_'")
    answer = str(_need(row, "answer", (str, int)))
    if answer not in ("1", "2"):
        raise ValueError(f"answer must be '1' or '2', got {answer!r}")
    return Example(
        question=sentence,
        choices=(_need(row, "option1", str), _need(row, "option2", str)),
        label=int(answer) - 1,
        uid=str(row.get("qID", "")),
    )


def _parse_boolq(row: Row) -> Example:
    label = _need(row, "label" if "label" in row else "answer")
    if not isinstance(label, bool):
        raise ValueError(f"label must be true or false, got {label!r}")
    return Example(
        question=_need(row, "question", str),
        choices=("no", "yes"),
        label=int(label),
        uid=str(row.get("idx", "")),
        passage=row.get("passage"),
    )


def _parse_mmlu(row: Row) -> Example:
    choices = tuple(str(_need(row, k)) for k in "ABCD")
    answer = str(_need(row, "answer")).strip()
    if answer not in "ABCD" or len(answer) != 1:
        raise ValueError(f"answer must be one of A, B, C, D, got {answer!r}")
    return Example(question=str(_need(row, "question")), choices=choices, label="ABCD".index(answer), uid="")


def _arc(config: str, folder: str) -> TaskSpec:
    return TaskSpec("allenai/ai2_arc", config, folder,
                    {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"},
                    _parse_arc, num_classes=5, hub_fallback=("test",))


def _winogrande(size: str) -> TaskSpec:
    return TaskSpec("allenai/winogrande", f"winogrande_{size}", "winogrande",
                    {"train": f"train_{size}.jsonl", "validation": "validation.jsonl"},
                    _parse_winogrande, num_classes=2, answer_words=("A", "B"), kind="cloze")


def _mmlu(subject: str) -> TaskSpec:
    return TaskSpec("cais/mmlu", subject, "mmlu",
                    {"test": f"{subject}_test.csv", "dev": f"{subject}_dev.csv", "validation": f"{subject}_val.csv"},
                    _parse_mmlu, num_classes=4, csv_columns=("question", "A", "B", "C", "D", "answer"),
                    hub_fallback=("test", "dev", "validation"), default_split="test")


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)


def _mmlu_hub_row(row: Row) -> Row:
    """cais/mmlu on the hub stores ``choices`` as a list and ``answer`` as an index."""
    if "choices" in row:
        row = {"question": row["question"], **dict(zip("ABCD", row["choices"])), "answer": "ABCD"[row["answer"]]}
    return row


TASKS: dict[str, TaskSpec] = {
    "arc_challenge": _arc("ARC-Challenge", "arc_challenge"),
    "arc_easy": _arc("ARC-Easy", "arc_easy"),
    "openbookqa": TaskSpec("allenai/openbookqa", "main", "openbookqa",
                           {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"},
                           _parse_obqa, num_classes=4, hub_fallback=("test",)),
    "winogrande_xs": _winogrande("xs"),
    "winogrande_s": _winogrande("s"),
    "winogrande_m": _winogrande("m"),
    "boolq": TaskSpec("google/boolq", None, "boolq",
                      {"train": "train_nopassage.jsonl", "validation": "validation.jsonl"},
                      _parse_boolq, num_classes=2, answer_words=("False", "True"), kind="boolean"),
    **{f"mmlu_{subject}": _mmlu(subject) for subject in MMLU_SUBJECTS},
}


def letters_transfer(head_words, task_words, most_choices: int) -> bool:
    """Whether a letters-format head with ``head_words`` can score a task: the same answer words, or letters
    on both sides and no question with more choices than the head has letters."""
    if tuple(head_words) == tuple(task_words):
        return True
    lettered = set(head_words) <= set(LETTERS) and set(task_words) <= set(LETTERS)
    return lettered and most_choices <= len(head_words)


def task_names() -> list[str]:
    return list(TASKS)


def task_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        names = [n for n in TASKS if not n.startswith("mmlu_")]
        raise UnknownTaskError(f"Unknown task {name!r}; expected one of {', '.join(names)}, mmlu_<subject> "
                               f"({len(MMLU_SUBJECTS)} subjects), a task named by register_task, or a .jsonl/.csv "
                               "file or folder of your own") from None


def task_splits(name: str) -> list[str]:
    """The splits of a task (built-in, registered or a path)."""
    from .user_tasks import user_task_spec

    user = user_task_spec(name)
    return list(user.files) if user is not None else list(task_spec(name).files)


def default_split(name: str) -> str:
    """The split evaluated when none is named: ``validation`` (``test`` for MMLU, or a folder without one)."""
    from .user_tasks import user_task_spec

    user = user_task_spec(name)
    if user is not None:
        return "validation" if "validation" in user.files else ("test" if "test" in user.files else "train")
    return task_spec(name).default_split


def default_data_dir() -> Path | None:
    """``$BAYES_POLAR_DATA`` as a path, or None (then tasks come from the hub)."""
    value = os.environ.get(DATA_ENV)
    return Path(value) if value else None


def split_heldout(task: Task) -> tuple[Task, Task]:
    """``(task-fit, task-heldout)``: the first 90 % of ``task``'s questions and the last 10 % (at least one)."""
    cut = len(task) - max(1, int(len(task) * HELDOUT_FRACTION))
    if cut < 1:
        raise DataFormatError(f"{task.source}: split {task.split!r} of task {task.name!r} has {len(task)} question(s), "
                              "too few to hold any out")
    return (replace(task, examples=task.examples[:cut], split=f"{task.split}-fit"),
            replace(task, examples=task.examples[cut:], split=f"{task.split}-heldout"))


def derived_split(split: str) -> tuple[str, str | None]:
    """``"train-heldout"`` → ``("train", "heldout")``; a plain split → ``(split, None)``."""
    base, _, part = split.rpartition("-")
    return (base, part) if base and part in DERIVED_SPLITS else (split, None)


def load_task(name: str, split: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> Task:
    """Load one split of a task as validated :class:`Example` s.

    Parameters
    ----------
    name: one of :func:`task_names`, a task named by ``register_task``, or a ``.jsonl``/``.csv`` file or
        folder in the generic schema (:mod:`bayes_polar.data.user_tasks`).
    split: ``train``, ``validation``, ``test`` (ARC, OBQA, MMLU; from the hub where the mirror lacks
        it), ``dev`` (MMLU).
    data_dir: folder of the local mirror (see ``shared/data/README.md``); defaults to
        ``$BAYES_POLAR_DATA``; when neither is set the hub id is used.
    limit: keep only the first ``limit`` examples (after validation of those rows).

    ``S-fit`` / ``S-heldout`` (see the module docstring) are cut from the whole of split ``S``, and
    ``limit`` then applies to the derived split.
    """
    base, part = derived_split(split)
    if part is not None:
        derived = split_heldout(load_task(name, base, data_dir))[DERIVED_SPLITS.index(part)]
        return derived if limit is None else replace(derived, examples=derived.examples[:limit])
    from .user_tasks import load_user_task, user_task_spec

    user = user_task_spec(name)
    if user is not None:
        return load_user_task(user, split, limit)
    spec = task_spec(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    local = data_dir / spec.folder / spec.files[split] if data_dir is not None and split in spec.files else None
    if data_dir is not None and split in spec.hub_fallback and not local.is_file():
        rows, source = _hub_rows(name, spec, split, limit, missing=local)
    elif data_dir is not None:
        rows, source = _local_rows(name, spec, split, data_dir, limit)
    else:
        rows, source = _hub_rows(name, spec, split, limit)
    examples, dropped = [], 0
    for where, row in rows:
        example = _parse_located(spec, row, source, where)
        if example is None:
            dropped += 1
            continue
        examples.append(example)
    if not rows:
        raise DataFormatError(f"{source}: split {split!r} of task {name!r} is empty (no rows)")
    if not examples:
        raise DataFormatError(f"{source}: split {split!r} of task {name!r} has no usable rows: all {dropped} row(s) "
                              f"have more than the task's {spec.num_classes} choices")
    if dropped:
        warnings.warn(f"{name}/{split}: dropped {dropped} row(s) of {source} with more than "
                      f"{spec.num_classes} choices", BayesPolarWarning, stacklevel=2)
    return Task(name, split, examples, spec.num_classes, spec.answer_words, source, dropped, spec.kind)


def _parse_located(spec: TaskSpec, row: Row, source: str, where: str) -> Example | None:
    """Parse a row, turning any problem into a DataFormatError that says where it is."""
    try:
        example = spec.parse(row)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        message = exc.args[0] if exc.args else repr(exc)
        raise DataFormatError(f"{source}:{where}: {message}") from None
    if len(example.choices) > spec.num_classes:
        return None  # more choices than the task's answer words can name
    return example


def _local_rows(name: str, spec: TaskSpec, split: str, data_dir: Path, limit: int | None):
    if split not in spec.files:
        raise DataFormatError(f"Task {name!r} has no split {split!r}; its splits: {', '.join(spec.files)}")
    path = data_dir / spec.folder / spec.files[split]
    if not path.is_file():
        raise MissingFileError(f"No data file at {path} (data dir {data_dir}); see shared/data/README.md")
    if spec.csv_columns:
        return _csv_rows(path, spec.csv_columns, limit), str(path)
    return _jsonl_rows(path, limit), str(path)


def _jsonl_rows(path: Path, limit: int | None):
    """Rows of a JSONL file through ``datasets``, each with its line number.

    Every line is checked to be one JSON object first (datasets/pyarrow name no line). When
    datasets cannot unify the rows (a field whose type differs between rows) the plain JSON
    rows are returned instead, so the row parser names the line and field that is off.
    """
    records = _json_records(path)
    if not records:
        return []
    try:
        with _quiet("datasets.packaged_modules.json.json"):
            dataset = _load_dataset("json", data_files=str(path), split="train")
    except Exception:  # noqa: BLE001 - pyarrow's schema errors: fall back to the plain rows
        dataset = None
    if dataset is None or len(dataset) != len(records):
        rows = [row for _, row in records]
    else:
        rows = dataset
    n = len(records) if limit is None else min(limit, len(records))
    return [(f"line {records[i][0]}", rows[i]) for i in range(n)]


def _csv_rows(path: Path, columns: tuple[str, ...], limit: int | None):
    """Rows of a header-less CSV file through ``datasets`` (MMLU's original format)."""
    import datasets

    if not _check_csv_shape(path, columns):
        return []
    features = datasets.Features({column: datasets.Value("string") for column in columns})
    try:
        dataset = _load_dataset("csv", data_files=str(path), split="train", column_names=list(columns),
                                header=None, keep_default_na=False, features=features, on_bad_lines="error")
    except Exception as exc:
        raise DataFormatError(f"{path}: cannot be read as CSV with columns {list(columns)} ({exc})") from None
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [(f"row {i + 1}", dataset[i]) for i in range(n)]


def _check_csv_shape(path: Path, columns: tuple[str, ...]) -> int:
    """Number of rows of a header-less CSV file; a row with another number of fields is located."""
    rows = 0
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            for fields in reader:
                if not fields:
                    continue  # blank line (pandas skips them too)
                rows += 1
                if len(fields) != len(columns):
                    raise DataFormatError(f"{path}:row {rows} (line {reader.line_num}): expected {len(columns)} "
                                          f"comma-separated fields ({', '.join(columns)}), got {len(fields)}")
        except csv.Error as exc:
            raise DataFormatError(f"{path}:line {reader.line_num}: not valid CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path}: after line {reader.line_num}: not UTF-8 text ({exc.reason})") from None
    return rows


def _json_records(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; the first bad line raises, located."""
    records = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{path}:line {i}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                      f"{exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:line {i}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise DataFormatError(f"{path}:line {i}: expected a JSON object, got {type(value).__name__}")
            records.append((i, value))
    return records


@contextlib.contextmanager
def _quiet(logger: str):
    """Silence one library logger for the duration (datasets logs errors that we re-raise located)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _hub_rows(name: str, spec: TaskSpec, split: str, limit: int | None, missing: Path | None = None):
    if split not in spec.files:
        raise DataFormatError(f"Task {name!r} has no split {split!r}; its splits: {', '.join(spec.files)}")
    hint = f"Pass --data-dir or set ${DATA_ENV} to a local mirror (see shared/data/README.md)."
    if missing is not None:
        hint = (f"Split {split!r} of {name} is not in the local mirror (no {missing}) and is read from the hub; "
                f"put the file there to use it offline.")
    source = spec.hub_id + (f" ({spec.hub_config})" if spec.hub_config else "")
    require_hub("dataset", source, hint)
    dataset = _load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_splits.get(split, split))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    fix = _mmlu_hub_row if spec.hub_id == "cais/mmlu" else (lambda r: r)
    return [(f"row {i}", fix(dataset[i])) for i in range(n)], source


def _load_dataset(*args, **kwargs):
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(*args, **kwargs)
