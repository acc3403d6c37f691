"""Every task loads from the local mirror with the row counts of shared/data/README.md."""
import json

import pytest

from bayes_polar.errors import DataFormatError, UnknownTaskError
from bayes_polar.tasks import load_task, task_names

COUNTS = {
    ("arc_challenge", "train"): 1119,
    ("arc_challenge", "validation"): 299,
    ("arc_easy", "train"): 2251,
    ("arc_easy", "validation"): 570,
    ("openbookqa", "train"): 4957,
    ("openbookqa", "validation"): 500,
    ("winogrande_xs", "train"): 160,
    ("winogrande_s", "train"): 640,
    ("winogrande_m", "train"): 2558,
    ("winogrande_s", "validation"): 1267,
    ("boolq", "train"): 9427,
    ("boolq", "validation"): 3270,
    ("mmlu_college_chemistry", "test"): 100,
    ("mmlu_college_chemistry", "dev"): 5,
    ("mmlu_college_physics", "test"): 102,
    ("mmlu_college_physics", "dev"): 5,
}


@pytest.mark.parametrize("name,split", sorted(COUNTS))
def test_row_counts(data_dir, name, split):
    task = load_task(name, split, data_dir)
    assert len(task) == COUNTS[(name, split)]
    assert task.dropped == 0
    for example in task.examples:
        assert 2 <= len(example.choices) <= task.num_classes
        assert 0 <= example.label < len(example.choices)


def test_every_registered_task_is_counted():
    assert {name for name, _ in COUNTS} == set(task_names())


def test_arc_numeric_labels_and_odd_choice_counts_are_kept(data_dir):
    rows = [json.loads(line) for line in (data_dir / "arc_easy" / "train.jsonl").read_text().splitlines()]
    task = load_task("arc_easy", "train", data_dir)
    numeric = [i for i, r in enumerate(rows) if r["choices"]["label"][0] == "1"]
    assert numeric, "the mirror has numeric-label rows"
    for i in numeric[:20]:
        assert task.examples[i].label == int(rows[i]["answerKey"]) - 1
    sizes = {len(e.choices) for e in task.examples}
    assert {3, 4, 5} <= sizes


def test_hand_checked_rows(data_dir):
    arc = load_task("arc_easy", "train", data_dir).examples[0]
    assert arc.question == "Which factor will most likely cause a person to develop a fever?"
    assert arc.choices[1] == "a bacterial population in the bloodstream" and arc.label == 1
    obqa = load_task("openbookqa", "train", data_dir).examples[0]
    assert obqa.question == "The sun is responsible for" and obqa.label == 3
    wino = load_task("winogrande_s", "train", data_dir).examples[0]
    assert wino.choices == ("Ian", "Dennis") and wino.label == 1 and "_" in wino.question
    boolq = load_task("boolq", "validation", data_dir).examples[0]
    assert boolq.passage.startswith("Ethanol fuel") and boolq.label == 0 and boolq.choices == ("no", "yes")
    assert load_task("boolq", "train", data_dir).examples[0].passage is None
    phys = load_task("mmlu_college_physics", "dev", data_dir).examples[0]
    assert phys.choices == ("4", "5", "6", "20") and phys.label == 0


def test_limit(data_dir):
    assert len(load_task("arc_easy", "validation", data_dir, limit=7)) == 7


def test_unknown_task_lists_known_ones(data_dir):
    with pytest.raises(UnknownTaskError, match="arc_easy"):
        load_task("arc_medium", "train", data_dir)


def _write(tmp_path, folder, name, text):
    (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / folder / name).write_text(text)


GOOD = '{"id": "x", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}\n'


def test_malformed_json_line_is_located(tmp_path):
    _write(tmp_path, "arc_easy", "train.jsonl", GOOD + GOOD + '{"id": "broken", "question": \n')
    with pytest.raises(DataFormatError, match=r"train.jsonl:line 3: not valid JSON"):
        load_task("arc_easy", "train", tmp_path)


def test_missing_field_is_located(tmp_path):
    _write(tmp_path, "arc_easy", "train.jsonl", GOOD + '{"id": "y", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}\n')
    with pytest.raises(DataFormatError, match=r"train.jsonl:line 2: missing field 'question'"):
        load_task("arc_easy", "train", tmp_path)


def test_label_outside_choices_is_located(tmp_path):
    _write(tmp_path, "arc_easy", "validation.jsonl", GOOD.replace('"answerKey": "A"', '"answerKey": "E"'))
    with pytest.raises(DataFormatError, match=r"line 1: answerKey 'E' is not one of the choice labels"):
        load_task("arc_easy", "validation", tmp_path)


def test_empty_split_is_an_error(tmp_path):
    _write(tmp_path, "arc_easy", "train.jsonl", "")
    with pytest.raises(DataFormatError):
        load_task("arc_easy", "train", tmp_path)


def test_malformed_csv_row(tmp_path):
    _write(tmp_path, "mmlu", "college_physics_test.csv", "What?,1,2,3,4,A\nWhy?,1,2,3,4,F\n")
    with pytest.raises(DataFormatError, match=r"college_physics_test.csv:row 2: answer must be one of A, B, C, D"):
        load_task("mmlu_college_physics", "test", tmp_path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="arc_easy"):
        load_task("arc_easy", "train", tmp_path)
