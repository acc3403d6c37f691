"""``bayes-polar`` on bad input: one ``bayes-polar: error: ...`` line naming what is wrong, exit code 1.

Each case goes through the public entry point (``main``, as the console script calls it) with the
tiny random Llama, so the error is the one a user sees.
"""
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import warnings

import pytest

from bayes_polar.data import hub
from bayes_polar.cli import main

GOOD = {"id": "x", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
TINY = ["--model", "tiny-random-llama", "--threads", "1", "--quiet", "--layers=-1", "--rank", "2"]


def _jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _fail(capsys, argv) -> str:
    """Run the CLI, expect exit code 1 and exactly one error line on stderr; return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("bayes-polar: warning:")]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("bayes-polar: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def data(tmp_path):
    """A data dir whose arc_easy/train.jsonl each test writes."""
    (tmp_path / "data" / "arc_easy").mkdir(parents=True)
    return tmp_path / "data"


@pytest.mark.parametrize("text,expected", [
    (_jsonl(GOOD, '{"id": "broken", "question": '), r"train.jsonl:line 2: not valid JSON \(Expecting value at column 30\)"),
    (_jsonl(GOOD, {k: v for k, v in GOOD.items() if k != "question"}), r"train.jsonl:line 2: missing field 'question'"),
    (_jsonl({**GOOD, "answerKey": "C"}), r"train.jsonl:line 1: answerKey 'C' is not one of the choice labels \['A', 'B'\]"),
    (_jsonl(GOOD, {**GOOD, "choices": ["a", "b"]}), r"train.jsonl:line 2: field 'choices' must be a JSON object, got list"),
    ("", r"train.jsonl: split 'train' of task 'arc_easy' is empty \(no rows\)"),
    (_jsonl(GOOD, {**GOOD, "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "A", "B", "B"]}}),
     r"train.jsonl:line 2: choice labels \['A', 'A', 'B', 'B'\] repeat a label"),
])
def test_bad_training_data(capsys, tmp_path, data, text, expected):
    (data / "arc_easy" / "train.jsonl").write_text(text)
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data), *TINY])
    assert re.search(expected, line), line


def test_a_data_file_that_is_not_utf8(capsys, tmp_path, data):
    text = (_jsonl(GOOD) + json.dumps({**GOOD, "question": "caf\u00e9?"}, ensure_ascii=False) + "\n").encode("latin-1")
    (data / "arc_easy" / "train.jsonl").write_bytes(text)
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data), *TINY])
    assert "train.jsonl:line 2: not UTF-8 text (byte 0xe9 at column" in line, line


def test_fit_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: arc_easy)" in out and "(default: arc_easy) (default: None)" not in out
    assert out.count("(default:") == out.count("(default: ") and "(default: None) (default:" not in out


def test_missing_data_file(capsys, tmp_path, data):
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data), *TINY])
    assert f"No data file at {data}/arc_easy/train.jsonl" in line


def test_a_task_without_a_training_split(capsys, tmp_path, data_dir):
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data_dir), "--task",
                          "mmlu_college_physics", *TINY])
    assert "Task 'mmlu_college_physics' has no split 'train'; its splits: test, dev" in line


@pytest.mark.parametrize("args,expected", [
    (["--task", "arc_medium"], "Unknown task 'arc_medium'; expected one of arc_challenge, arc_easy"),
    (["--eval-tasks", "arc_easy,obqa"], "Unknown task 'obqa'"),
    (["--format", "letters", "--task", "winogrande_xs", "--eval-tasks", "arc_easy"],
     "eval_tasks: arc_easy answers with ('A', 'B', 'C', 'D', 'E'), but a letters-format head trained on "
     "winogrande_xs has one row per answer word ('A', 'B')"),
    (["--format", "letters", "--task", "arc_easy", "--eval-tasks", "boolq"], "boolq answers with ('False', 'True')"),
    (["--steps", "0"], "Expected steps >= 1 but got 0"),
    (["--on-nan", "ignore"], "on_nan must be one of ('stop', 'skip'), got 'ignore'"),
    (["--orthogonality-tol", "0"], "Expected orthogonality_tol > 0 (or None) but got 0.0"),
    (["--prior-args", "{variance: 1}"], "prior_args must be a JSON object"),
    (["--overwrite", "--resume"], "--overwrite and --resume exclude each other"),
])
def test_bad_options(capsys, tmp_path, data_dir, args, expected):
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data_dir), *TINY, *args])
    assert expected in line
    assert not (tmp_path / "run").exists(), "a bad option must fail before RUN_DIR is created"


@pytest.mark.parametrize("values,expected", [
    ({"steps": "5"}, "key 'steps': expected an integer, got str '5'"),
    ({"loglik_features": "false"}, "key 'loglik_features': expected true or false, got str 'false'"),
    ({"seed": 1e308}, "key 'seed': expected an integer, got float 1e+308"),
    ({"threads": 100000}, "Expected threads <= 1024 but got 100000"),
])
def test_a_config_file_value_of_the_wrong_type(capsys, tmp_path, values, expected):
    (tmp_path / "run.json").write_text(json.dumps(values))
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "run.json")])
    assert f"{tmp_path / 'run.json'}: {expected}" in line
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_a_config_file(capsys, tmp_path):
    (tmp_path / "run.json").write_text('{"learning_rate": 0.1}')
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "run.json")])
    assert "Unknown configuration keys ['learning_rate']" in line


@pytest.mark.parametrize("kind,source,expected", [
    ("prior", "x = 1\n", r"must define exactly one public Prior: a subclass of bayes_polar.bll.model.Prior whose name "
                         r"ends in 'Prior'; found none"),
    ("prior", "import torch\nraise ValueError('no')\n", r"my_file.py:line 2 fails to import: ValueError: no"),
    ("guide", "def NormalGuide(model:\n", r"my_file.py:line 1 fails to import: SyntaxError"),
    ("guide", "x = 1\n", r"must define exactly one public Guide"),
])
def test_bad_prior_or_guide_file(capsys, tmp_path, data_dir, kind, source, expected):
    path = tmp_path / "my_file.py"
    path.write_text(source)
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data_dir), "--train-limit", "8",
                          f"--{kind}", str(path), *TINY])
    assert str(path) in line and re.search(expected, line), line


def test_prior_arguments_the_prior_rejects(capsys, tmp_path, data_dir):
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data_dir), "--train-limit", "8",
                          "--prior", "isotropic", "--prior-args", '{"variance": -2}', *TINY])
    assert "prior 'isotropic' (IsotropicPrior) rejects the arguments {'variance': -2}: Expected variance > 0" in line


def test_unknown_model_offline(capsys, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    try:
        line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data_dir),
                              "--model", "someone/no-such-model", "--threads", "1", "--quiet"])
    finally:
        hub.hub_reachable.cache_clear()
    assert "model 'someone/no-such-model' is not available offline" in line
    assert "Pass a local folder or an embedded name: smollm2-135m, tiny-random-llama" in line


def test_a_folder_that_is_not_a_model(capsys, tmp_path, data_dir):
    (tmp_path / "model").mkdir()
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data_dir),
                          "--model", str(tmp_path / "model"), "--threads", "1", "--quiet"])
    assert f"'{tmp_path / 'model'}' is not a model folder that transformers can load" in line
    line = _fail(capsys, ["fit", "--out", str(tmp_path / "run2"), "--data-dir", str(data_dir),
                          "--model", str(tmp_path / "nowhere"), "--threads", "1", "--quiet"])
    assert f"No model folder at '{tmp_path / 'nowhere'}'" in line


# ----------------------------------------------------------------------------- with a finished run
@pytest.fixture(scope="module")
def letters_run(tmp_path_factory, data_dir):
    """A finished 2-step letters-format run on WinoGrande (head rows: A, B), prompts cut to 32 tokens.

    Returns the run directory and what the command printed on stderr.
    """
    run = tmp_path_factory.mktemp("cli") / "run"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("always")  # as outside pytest, which silences BayesPolarWarning
        code = main(["fit", "--out", str(run), "--data-dir", str(data_dir), "--task", "winogrande_xs", "--format",
                     "letters", "--train-limit", "8", "--eval-limit", "4", "--steps", "2", "--batch-size", "4",
                     "--layers=-1", "--rank", "2", "--checkpoint-every", "1", "--predictive-samples", "8",
                     "--max-length", "32", *TINY])
    assert code == 0, stderr.getvalue()
    return run, stderr.getvalue()


def test_truncated_prompts_are_counted_and_reported(letters_run):
    run, stderr = letters_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["truncated"] == 8
    assert metrics["evaluations"]["winogrande_xs/validation"]["truncated"] == 4
    assert ("bayes-polar: warning: winogrande_xs/train: 8 of 8 prompts are longer than max_length=32 tokens and "
            "lose tokens from the left") in stderr.splitlines()
    assert "bayes-polar: warning: winogrande_xs/validation: 4 of 4 prompts are longer" in stderr


def test_run_dir_is_not_overwritten(capsys, letters_run, data_dir):
    letters_run, _ = letters_run
    before = (letters_run / "metrics.json").read_bytes()
    line = _fail(capsys, ["fit", "--out", str(letters_run), "--data-dir", str(data_dir), *TINY])
    assert f"run directory {letters_run} exists and is not empty: pass --overwrite" in line
    assert (letters_run / "metrics.json").read_bytes() == before


def test_evaluating_a_letters_head_on_other_answer_words(capsys, letters_run, data_dir):
    letters_run, _ = letters_run
    line = _fail(capsys, ["evaluate", str(letters_run), "--task", "arc_easy", "--data-dir", str(data_dir),
                          "--limit", "4"])
    assert "arc_easy/validation.jsonl: a question has 4 choices, this letters-format head names 2 (A, B)" in line
    assert "use --format options" in line


def test_evaluating_a_test_split_the_mirror_lacks_offline(capsys, letters_run, data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    try:
        line = _fail(capsys, ["evaluate", str(letters_run[0]), "--task", "arc_easy", "--split", "test",
                              "--data-dir", str(data_dir)])
    finally:
        hub.hub_reachable.cache_clear()
    assert "dataset 'allenai/ai2_arc (ARC-Easy)' is not available offline" in line
    assert "Split 'test' of arc_easy is not in the local mirror" in line


def test_predict_and_export_errors_are_one_line(capsys, letters_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"]}\n{"question": "q", "choices": ["a"]}\n')
    line = _fail(capsys, ["predict", str(letters_run[0]), "--input", str(bad)])
    assert "bad.jsonl:line 2: field 'choices' must have 2 to 26 choices, got 1" in line
    line = _fail(capsys, ["predict", str(letters_run[0]), "--input", str(tmp_path / "missing.jsonl")])
    assert "No data file at" in line
    many = tmp_path / "many.csv"
    many.write_text('question,choices\nq,"[""a"", ""b"", ""c""]"\n')
    line = _fail(capsys, ["predict", str(letters_run[0]), "--input", str(many)])
    assert "a question has 3 choices, this letters-format head names 2 (A, B)" in line


def test_resume_with_another_configuration(capsys, letters_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(letters_run[0], run)
    line = _fail(capsys, ["fit", "--out", str(run), "--resume", "--data-dir", str(data_dir), "--task", "winogrande_xs",
                          "--format", "letters", "--steps", "3", *TINY])
    assert "--resume with a different configuration" in line and "batch_size: " in line


def test_resume_from_corrupted_checkpoints(capsys, letters_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(letters_run[0], run)
    for tensors in (run / "checkpoints").glob("step-*/tensors.safetensors"):
        data = tensors.read_bytes()
        tensors.write_bytes(data[: len(data) // 2])  # truncated
    config = json.loads((run / "config.json").read_text())
    config["steps"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    line = _fail(capsys, ["fit", "--out", str(run), "--resume", "--config", str(tmp_path / "config.json"), *TINY])
    assert f"no valid checkpoint in {run / 'checkpoints'}" in line
    assert "tensors.safetensors has" in line and "(truncated?)" in line


def test_the_console_script_prints_one_line_not_a_traceback(tmp_path, data):
    """A real process: exit code 1, one error line on stderr, no traceback."""
    (data / "arc_easy" / "train.jsonl").write_text(_jsonl(GOOD, "[1, 2]"))
    cmd = [sys.executable, "-m", "bayes_polar.cli", "fit", "--out", str(tmp_path / "run"), "--data-dir", str(data),
           *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"bayes-polar: error: {data}/arc_easy/train.jsonl:line 2: expected a JSON object, got list"]


def test_resume_skips_a_corrupted_latest_checkpoint_and_says_so(capsys, letters_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(letters_run[0], run)
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    state = run / "checkpoints" / latest / "state.json"
    state.write_bytes(state.read_bytes().replace(b"1", b"2", 1))  # same size, other bytes
    config = json.loads((run / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code = main(["fit", "--out", str(run), "--resume", "--config", str(tmp_path / "config.json"), *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [warning] = [line for line in captured.err.splitlines() if "corrupt" in line]
    assert warning.startswith(f"bayes-polar: warning: skipping corrupt checkpoint(s) {run / 'checkpoints' / latest}: "
                              "state.json has sha256")
    assert "(corrupted)" in warning and "falling back to" in warning
    assert "resuming from" in captured.out


def test_layers_accepts_negative_indices_without_equals_sign():
    from bayes_polar.cli import _join_negative_values, build_parser

    argv = _join_negative_values(["fit", "--out", "r", "--layers", "-2,-1", "--steps", "3"])
    assert argv == ["fit", "--out", "r", "--layers=-2,-1", "--steps", "3"]
    assert build_parser().parse_args(argv).layers == "-2,-1"
    assert _join_negative_values(["fit", "--layers", "-1"]) == ["fit", "--layers=-1"]
    assert _join_negative_values(["fit", "--layers", "all"]) == ["fit", "--layers", "all"]


def test_after_a_bad_prior_file_the_corrected_command_reuses_run_dir(capsys, tmp_path, data_dir):
    (tmp_path / "noprior.py").write_text("class NotAPrior:\n    pass\n")
    run = tmp_path / "run"
    small = ["--data-dir", str(data_dir), "--train-limit", "8", "--eval-limit", "4", "--steps", "1",
             "--batch-size", "4", *TINY]
    line = _fail(capsys, ["fit", "--out", str(run), "--prior", str(tmp_path / "noprior.py"), *small])
    assert "must define exactly one public Prior" in line
    assert main(["fit", "--out", str(run), "--prior", "isotropic", *small]) == 0  # no --overwrite needed
    assert (run / "metrics.json").exists()


def test_demo_preset_is_a_valid_configuration():
    from bayes_polar.cli import DEMO
    from bayes_polar.config import FitConfig

    config = FitConfig.from_dict(DEMO)
    assert config.format == "options" and config.method == "polar-vbll" and config.train_limit is None


def test_tasks_lists_local_counts_and_hub_splits(capsys, data_dir):
    assert main(["tasks", "--data-dir", str(data_dir)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "train 2251, validation 570, test (hub)" in lines["arc_easy"]
    assert "test 102, dev 5, validation (hub)" in lines["mmlu_college_physics"]
    assert "test (hub), dev (hub), validation (hub)" in lines["mmlu_anatomy"]
