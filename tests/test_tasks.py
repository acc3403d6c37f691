"""Every task loads from the local mirror with the row counts of shared/data/README.md."""
import json

import pytest

from bayes_polar.errors import DataFormatError, UnknownTaskError
from bayes_polar.data.tasks import load_task, task_names

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


def test_every_local_task_is_counted_and_every_mmlu_subject_is_a_task():
    from bayes_polar.data.tasks import MMLU_SUBJECTS

    mmlu = {name for name in task_names() if name.startswith("mmlu_")}
    assert len(MMLU_SUBJECTS) == 57 and mmlu == {f"mmlu_{s}" for s in MMLU_SUBJECTS}
    local = {name for name, _ in COUNTS}
    assert local == (set(task_names()) - mmlu) | {"mmlu_college_chemistry", "mmlu_college_physics"}


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


def test_derived_splits_cut_the_last_tenth_of_the_whole_split(data_dir):
    """train-fit + train-heldout partition train in order (the held-out slice is temperature scaling's and
    the tuning protocol's dev split); ``limit`` applies after the cut, never to the split it is cut from."""
    train = load_task("arc_easy", "train", data_dir)
    fit, heldout = load_task("arc_easy", "train-fit", data_dir), load_task("arc_easy", "train-heldout", data_dir)
    assert (len(fit), len(heldout)) == (2026, 225) and fit.examples + heldout.examples == train.examples
    assert (fit.split, heldout.split) == ("train-fit", "train-heldout")
    assert load_task("arc_easy", "train-heldout", data_dir, limit=3).examples == heldout.examples[:3]
    assert load_task("mmlu_college_physics", "dev", data_dir).split == "dev"  # a real split, not a derived one
    assert len(load_task("winogrande_s", "validation-heldout", data_dir)) == 126


def test_a_one_question_split_cannot_hold_one_out(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(DataFormatError, match="too few to hold any out"):
        load_task(str(path), "train-fit")


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


# ----------------------------------------------------------------------------- every bad row is located
def _row(**changes):
    row = json.loads(GOOD)
    row.update(changes)
    return json.dumps(row) + "\n"


@pytest.mark.parametrize("text,match", [
    (GOOD + "[1, 2]\n", r"train.jsonl:line 2: expected a JSON object, got list"),
    (GOOD + _row(choices="abc"), r"train.jsonl:line 2: field 'choices' must be a JSON object, got str \"abc\""),
    (_row(choices={"text": "ab", "label": ["A", "B"]}), r"line 1: field 'choices.text' must be a list of strings"),
    (GOOD + _row(question=5), r"line 2: field 'question' must be a string, got int 5"),
    (_row(question=None), r"line 1: missing field 'question'"),
    (_row(choices={"text": ["a"], "label": ["A"]}), r"line 1: choices must have as many texts as labels \(>= 2\)"),
    (GOOD + "\n\n" + _row(answerKey="Z"), r"line 4: answerKey 'Z' is not one of the choice labels \['A', 'B'\]"),
    ("", r"train.jsonl: split 'train' of task 'arc_easy' is empty \(no rows\)"),
    ("\n  \n", r"split 'train' of task 'arc_easy' is empty"),
    (_row(choices={"text": list("abcdef"), "label": list("ABCDEF")}),
     r"has no usable rows: all 1 row\(s\) have more than the task's 5 choices"),
])
def test_bad_jsonl_rows_name_file_line_and_field(tmp_path, text, match):
    _write(tmp_path, "arc_easy", "train.jsonl", text)
    with pytest.raises(DataFormatError, match=match):
        load_task("arc_easy", "train", tmp_path)


@pytest.mark.parametrize("folder,name,task,text,match", [
    ("winogrande", "train_xs.jsonl", "winogrande_xs",
     '{"qID": "1", "sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "3"}\n',
     r"train_xs.jsonl:line 1: answer must be '1' or '2', got '3'"),
    ("winogrande", "train_xs.jsonl", "winogrande_xs",
     '{"qID": "1", "sentence": "no blank", "option1": "x", "option2": "y", "answer": "1"}\n',
     r"line 1: sentence has no blank '_'"),
    ("boolq", "train_nopassage.jsonl", "boolq", '{"question": "is it?", "answer": "yes"}\n',
     r"train_nopassage.jsonl:line 1: label must be true or false, got 'yes'"),
    ("openbookqa", "train.jsonl", "openbookqa", GOOD, r"line 1: missing field 'question_stem'"),
])
def test_bad_rows_of_other_tasks(tmp_path, folder, name, task, text, match):
    _write(tmp_path, folder, name, text)
    with pytest.raises(DataFormatError, match=match):
        load_task(task, "train", tmp_path)


@pytest.mark.parametrize("text,match", [
    ("What?,1,2,3,4,A\nWhy?,1,2,3,A\n", r"college_physics_test.csv:row 2 \(line 2\): expected 6 comma-separated "
                                       r"fields \(question, A, B, C, D, answer\), got 5"),
    ("What?,1,2,3,4,A,extra\n", r"row 1 \(line 1\): expected 6 comma-separated fields .* got 7"),
    ('What?,"1,2,3,4,A\n', r"college_physics_test.csv:line 1: not valid CSV"),
    ("", r"split 'test' of task 'mmlu_college_physics' is empty"),
])
def test_bad_csv_rows_are_located(tmp_path, text, match):
    _write(tmp_path, "mmlu", "college_physics_test.csv", text)
    with pytest.raises(DataFormatError, match=match):
        load_task("mmlu_college_physics", "test", tmp_path)


def test_a_field_whose_type_changes_between_rows_is_located(tmp_path):
    # pyarrow cannot unify the column (object, then string); the plain rows name the line
    _write(tmp_path, "arc_easy", "train.jsonl", GOOD + GOOD + _row(choices="A or B"))
    with pytest.raises(DataFormatError, match=r"line 3: field 'choices' must be a JSON object"):
        load_task("arc_easy", "train", tmp_path)


def test_missing_file_and_split_are_library_errors(tmp_path):
    from bayes_polar.errors import BayesPolarError, MissingFileError

    with pytest.raises(MissingFileError, match=r"No data file at .*arc_easy/train.jsonl") as info:
        load_task("arc_easy", "train", tmp_path)
    assert isinstance(info.value, (BayesPolarError, FileNotFoundError))
    with pytest.raises(DataFormatError, match=r"Task 'winogrande_s' has no split 'test'; its splits: train, validation"):
        load_task("winogrande_s", "test", tmp_path)


def test_test_splits_the_mirror_lacks_come_from_the_hub_or_fail_clearly(tmp_path, monkeypatch):
    from bayes_polar.errors import OfflineError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from bayes_polar.data import hub
    hub.hub_reachable.cache_clear()
    try:
        for name, split in (("arc_easy", "test"), ("openbookqa", "test"), ("mmlu_anatomy", "test")):
            with pytest.raises(OfflineError, match=rf"Split '{split}' of {name} is not in the local mirror"):
                load_task(name, split, tmp_path)
    finally:
        hub.hub_reachable.cache_clear()
