"""Tasks from the user's own files: the generic schema in JSONL and CSV, folders, register_task, errors."""
import csv
import json

import pytest

from bayes_polar.data.tasks import load_task
from bayes_polar.data.user_tasks import REGISTERED, register_task
from bayes_polar.errors import ConfigError, DataFormatError

ROWS = [
    {"question": "Which planet is closest to the Sun?", "choices": ["Venus", "Mercury", "Mars"], "answer": 1},
    {"question": "What do bees make?", "choices": ["honey", "silk"], "answer": "honey", "id": "bees"},
    {"question": "Is it raining?", "choices": ["yes", "no", "maybe", "later"], "context": "Clouds are grey."},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_file_is_every_split_with_unequal_choices_and_optional_answers(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", ROWS)
    task = load_task(str(path), "test")
    assert [e.label for e in task.examples] == [1, 0, None]
    assert [len(e.choices) for e in task.examples] == [3, 2, 4] and task.num_classes == 4
    assert task.answer_words == ("A", "B", "C", "D")
    assert task.examples[1].uid == "bees" and task.examples[0].uid == "mine.jsonl:line 1"
    assert task.examples[2].passage == "Clouds are grey."
    with pytest.raises(DataFormatError, match=r"mine.jsonl:line 3: field 'answer' is missing; training"):
        load_task(str(path), "train")


def test_context_is_shown_before_the_question(tmp_path):
    from bayes_polar.data.formats import letters_prompt, option_texts

    example = load_task(str(_jsonl(tmp_path / "q.jsonl", ROWS)), "test").examples[2]
    assert option_texts(example)[0][0] == "Passage: Clouds are grey.\nQuestion: Is it raining?\nAnswer:"
    assert "Passage: Clouds are grey.\nQuestion: Is it raining?\nChoices:\nA) yes" in letters_prompt(example)


def test_csv_and_a_folder_of_splits(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ROWS[:2])
    with open(folder / "test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "choices", "answer"])
        writer.writerow(["Two plus two?", json.dumps(["3", "4", "5"]), "4"])  # the text "4", not index 4
        writer.writerow(["Sky colour?", json.dumps(["blue", "green"]), "0"])  # no such text: an index
    train, test = load_task(str(folder), "train"), load_task(str(folder), "test")
    assert len(train) == 2 and [e.label for e in test.examples] == [1, 0]
    with pytest.raises(DataFormatError, match=r"has no split 'validation'; its splits: train, test"):
        load_task(str(folder), "validation")


def test_register_task_maps_columns(tmp_path):
    path = tmp_path / "pets.csv"
    path.write_text("prompt,opt1,opt2,opt3,gold\nWhich one barks?,cat,dog,,dog\nWhich one purrs?,cat,dog,fish,0\n")
    try:
        register_task("pets", path, fields={"question": "prompt", "choices": ["opt1", "opt2", "opt3"],
                                            "answer": "gold"})
        task = load_task("pets", "train")
        assert [e.choices for e in task.examples] == [("cat", "dog"), ("cat", "dog", "fish")]
        assert [e.label for e in task.examples] == [1, 0]
        with pytest.raises(ConfigError, match="built-in task"):
            register_task("arc_easy", path)
        with pytest.raises(ConfigError, match=r"fields \['label'\] are not in the schema"):
            register_task("pets2", path, fields={"label": "gold"})
    finally:
        REGISTERED.pop("pets", None)


@pytest.mark.parametrize("row,message", [
    ({"choices": ["a", "b"], "answer": 0}, r"line 2: missing field 'question'"),
    ({"question": "q", "choices": "a or b"}, r"line 2: field 'choices' must be a JSON list of strings"),
    ({"question": "q", "choices": ["a"]}, r"line 2: field 'choices' must have 2 to 26 choices, got 1"),
    ({"question": "q", "choices": [str(i) for i in range(27)]}, r"must have 2 to 26 choices, got 27"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, r"line 2: field 'answer' index 2 is out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, r"'c' is neither one of the choices"),
    ({"question": 3, "choices": ["a", "b"]}, r"line 2: field 'question' must be a string"),
])
def test_bad_rows_are_located(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataFormatError, match=message):
        load_task(str(path), "test")


def test_ragged_csv_row_is_located(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('question,choices\nq,"[""a"", ""b""]"\nq2\n')
    with pytest.raises(DataFormatError, match=r"bad.csv:line 3: expected 2 comma-separated fields"):
        load_task(str(path), "test")


def test_a_path_task_is_a_valid_config_task(tmp_path):
    from bayes_polar.config import FitConfig
    from bayes_polar.run import eval_targets

    path = str(_jsonl(tmp_path / "mine.jsonl", ROWS[:2]))
    config = FitConfig(task=path, eval_tasks=[path + ":test"])
    assert eval_targets(config.eval_tasks, config.task) == [(path, "test")]
    assert eval_targets("", path) == []  # a single file's questions are the training questions


def test_questions_for_the_predictor_dicts_or_strings_with_choices():
    from bayes_polar.predict import questions_task

    task = questions_task(["Red or blue?", "Up or down?"], choices=["red", "blue"])
    assert [e.choices for e in task.examples] == [("red", "blue")] * 2 and task.examples[0].label is None
    task = questions_task(["Red?", "Which?"], choices=[["yes", "no"], ["a", "b", "c"]])
    assert [len(e.choices) for e in task.examples] == [2, 3] and task.num_classes == 3
    assert questions_task({"question": "q", "choices": ["a", "b"], "answer": "b"}).examples[0].label == 1
    with pytest.raises(DataFormatError, match=r"questions\[0\] is a string: pass choices"):
        questions_task("Which?")
    with pytest.raises(DataFormatError, match=r"questions\[1\]: field 'choices' must have 2 to 26 choices"):
        questions_task([{"question": "q", "choices": ["a", "b"]}, {"question": "q", "choices": ["a"]}])
