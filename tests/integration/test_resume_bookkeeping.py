"""``--resume`` changes nothing a run computes unless asked: steps, schedule, config in checkpoints, no run at all."""
import json
import shutil

import pytest

from bayes_polar.cli import main

pytestmark = pytest.mark.integration
TINY = ["--model", "tiny-random-llama", "--threads", "1", "--quiet", "--layers=-1", "--rank", "2",
        "--train-limit", "16", "--eval-limit", "8", "--batch-size", "4", "--checkpoint-every", "2"]


def _fail(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("bayes-polar: warning:")]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("bayes-polar: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("resume") / "run"
    assert main(["fit", "--out", str(run), "--data-dir", str(data_dir), *TINY, "--steps", "4"]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _fit(run, data_dir, *args):
    return ["fit", "--out", str(run), "--data-dir", str(data_dir), *TINY, "--resume", *args]


def test_fewer_steps_than_the_checkpoint_are_refused(capsys, run, data_dir):
    before = (run / "config.json").read_text()
    line = _fail(capsys, _fit(run, data_dir, "--steps", "2"))
    assert "--steps 2, but checkpoint" in line and "is at step 4" in line
    assert (run / "config.json").read_text() == before


def test_more_steps_need_extend_and_the_schedule_is_stated(capsys, run, data_dir):
    before = (run / "config.json").read_text()
    line = _fail(capsys, _fit(run, data_dir, "--steps", "6"))
    assert "planned for 4: the cosine learning-rate schedule (0 warm-up steps" in line and "--extend" in line
    assert (run / "config.json").read_text() == before
    assert main(_fit(run, data_dir, "--steps", "6", "--extend")) == 0
    out = capsys.readouterr().out
    assert "--extend: steps 4 -> 6; the cosine learning-rate schedule" in out
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 6
    assert json.loads((run / "config.json").read_text())["steps"] == 6


def test_the_checkpoint_carries_the_config_when_config_json_is_gone(capsys, run, data_dir):
    (run / "config.json").unlink()
    line = _fail(capsys, _fit(run, data_dir, "--steps", "4", "--seed", "1"))
    assert "--resume with a different configuration than checkpoint" in line and "seed: 0 -> 1" in line
    assert main(_fit(run, data_dir, "--steps", "4")) == 0


def test_config_json_that_contradicts_the_checkpoint_is_refused(capsys, run, data_dir):
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    line = _fail(capsys, _fit(run, data_dir, "--steps", "4", "--lr", "0.5"))
    assert "than checkpoint" in line and "lr: 0.001 -> 0.5" in line


def test_resume_of_a_directory_without_a_run_is_an_error(capsys, tmp_path, data_dir):
    line = _fail(capsys, _fit(tmp_path / "mistyped", data_dir, "--steps", "4"))
    assert f"--resume: {tmp_path / 'mistyped'} holds no run to resume" in line
    assert not (tmp_path / "mistyped").exists()
