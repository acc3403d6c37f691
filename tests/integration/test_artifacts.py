"""Files read back are checked: sha256 manifests for final weights and prefix caches; faults of the disk are one line.

Corruptions are made the way the probe made them (sign bits flipped in the data, a truncated or
missing file, NaN states); a full disk is a real kernel limit (RLIMIT_FSIZE) on a real process.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
from safetensors.torch import load_file, save_file

from bayes_polar.cli import main
from bayes_polar.training.manifest import write_manifest

pytestmark = pytest.mark.integration
TINY = ["--model", "tiny-random-llama", "--threads", "1", "--quiet", "--layers=-1", "--rank", "2",
        "--train-limit", "16", "--eval-limit", "8", "--batch-size", "4", "--steps", "4", "--checkpoint-every", "2"]


def _run(capsys, argv) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as outside pytest, which silences BayesPolarWarning
        code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def _error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("bayes-polar: warning:")]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("bayes-polar: error: "), err
    return lines[0]


def _flip_signs(path, fraction=0.14) -> None:
    """Flip the sign bit of ``fraction`` of the float32 values of a safetensors file, header untouched."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(start + 3, len(data), max(1, int(4 / fraction)) // 4 * 4):
        data[i] ^= 0x80
    path.write_bytes(bytes(data))


def _validation(run) -> dict:
    result = json.loads((run / "metrics.json").read_text())["evaluations"]["arc_easy/validation"]
    return {k: result[k] for k in ("acc", "nll", "ece")}


@pytest.fixture(scope="module")
def cached(tmp_path_factory, data_dir):
    """A finished run whose prefix caches persist in a cache folder."""
    root = tmp_path_factory.mktemp("cached")
    cache = root / "cache"
    assert main(["fit", "--out", str(root / "run"), "--data-dir", str(data_dir), "--cache-dir", str(cache), *TINY]) == 0
    return root / "run", cache


def _train_cache(cache):
    [path] = [p for p in cache.rglob("arc_easy-train-*.safetensors")]
    return path


@pytest.mark.parametrize("corrupt", ["signs", "truncated", "nan"])
def test_a_bad_cache_file_is_recomputed_with_a_warning(capsys, cached, tmp_path, data_dir, corrupt):
    run, original = cached
    cache = tmp_path / "cache"
    shutil.copytree(original, cache)
    path = _train_cache(cache)
    if corrupt == "signs":
        _flip_signs(path)
    elif corrupt == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:  # NaN written by a broken writer, with a matching manifest: not the learning rate's fault
        states = load_file(path)
        states[next(iter(states))][0, 0] = float("nan")
        save_file(states, path)
        write_manifest(path.parent, [path.name], path.name.removesuffix(".safetensors") + ".checksums.json")
    code, err = _run(capsys, ["fit", "--out", str(tmp_path / "again"), "--data-dir", str(data_dir), "--cache-dir",
                              str(cache), *TINY])
    assert code == 0, err
    assert f"bayes-polar: warning: prefix cache {path} is unusable, recomputing it" in err
    assert "lr" not in err
    assert _validation(tmp_path / "again") == _validation(run)
    load_file(path)  # rewritten whole


def test_a_corrupt_final_head_is_an_error_naming_it(capsys, cached, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cached[0], run)
    before = (run / "metrics.json").read_bytes()
    _flip_signs(run / "head.safetensors")
    line = _error(*_run(capsys, ["evaluate", str(run), "--task", "arc_easy", "--limit", "4"]))
    assert f"{run / 'head.safetensors'} has sha256" in line and "(corrupted)" in line, line
    assert "is valid: run the same bayes-polar fit again with --resume to rewrite it" in line
    assert (run / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("name", ["zero_shot.safetensors", "layout.json"])
def test_a_corrupt_run_layout_is_an_error_naming_it(capsys, cached, tmp_path, data_dir, name):
    """What prediction reads besides the weights is in the run's manifest too: a flipped bit is caught."""
    run = tmp_path / "run"
    shutil.copytree(cached[0], run)
    assert {"layout.json", "zero_shot.safetensors"} <= set(json.loads((run / "checksums.json").read_text())["files"])
    before = (run / "metrics.json").read_bytes()
    if name == "layout.json":
        values = json.loads((run / name).read_text())
        (run / name).write_text(json.dumps({**values, "train_examples": values["train_examples"] + 1}))
    else:
        _flip_signs(run / name)
    for argv in (["evaluate", str(run), "--task", "arc_easy", "--limit", "4"], ["predict", str(run), "--input",
                 str(tmp_path / "missing.jsonl")]):
        line = _error(*_run(capsys, argv))
        assert f"{run / name} has " in line and ("(corrupted)" in line or "(truncated?)" in line), line
        assert "run the same bayes-polar fit again with --resume to rewrite it" in line
    assert (run / "metrics.json").read_bytes() == before
    argv = ["fit", "--out", str(run), "--data-dir", str(data_dir), "--cache-dir", str(cached[1]), *TINY, "--resume"]
    code, err = _run(capsys, argv)  # what the message says to do
    assert code == 0, err
    assert (run / name).read_bytes() == (cached[0] / name).read_bytes()
    assert _run(capsys, ["evaluate", str(run), "--task", "arc_easy", "--limit", "4"])[0] == 0


def test_a_head_missing_after_a_kill_is_rewritten_by_resume(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    argv = ["fit", "--out", str(run), "--data-dir", str(data_dir), *TINY]
    assert main(argv) == 0
    expected = _validation(run)
    (run / "head.safetensors").unlink()  # killed between the final writes
    line = _error(*_run(capsys, ["evaluate", str(run), "--task", "arc_easy", "--limit", "4"]))
    assert f"{run / 'head.safetensors'} is missing" in line and "--resume" in line
    code, err = _run(capsys, [*argv, "--resume"])
    assert code == 0, err
    assert _validation(run) == expected
    assert _run(capsys, ["evaluate", str(run), "--task", "arc_easy", "--limit", "4"])[0] == 0


def test_a_malformed_metrics_file_fails_before_evaluating(capsys, cached, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cached[0], run)
    for text in ("{not json", '{"method": "polar-vbll"}'):
        (run / "metrics.json").write_text(text)
        predictions = (run / "predictions.safetensors").read_bytes()
        line = _error(*_run(capsys, ["evaluate", str(run), "--task", "arc_easy", "--limit", "4"]))
        assert str(run / "metrics.json") in line
        assert (run / "predictions.safetensors").read_bytes() == predictions
        assert (run / "metrics.json").read_text() == text


def test_a_truncated_predictions_file_fails_before_evaluating(capsys, cached, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cached[0], run)
    before = (run / "metrics.json").read_bytes()
    (run / "predictions.safetensors").write_bytes((run / "predictions.safetensors").read_bytes()[:5])
    line = _error(*_run(capsys, ["evaluate", str(run), "--task", "arc_easy", "--limit", "4"]))
    assert f"{run / 'predictions.safetensors'} does not parse as safetensors" in line
    assert (run / "metrics.json").read_bytes() == before


def test_a_truncated_ensemble_member_head_is_retrained_on_resume(capsys, tmp_path, data_dir):
    run = tmp_path / "ens"
    argv = ["fit", "--out", str(run), "--data-dir", str(data_dir), *TINY, "--method", "lora-ensemble",
            "--ensemble-size", "2"]
    assert main(argv) == 0
    expected = _validation(run)
    head = run / "members" / "1" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:7])
    code, err = _run(capsys, [*argv, "--resume"])
    assert code == 0, err
    assert "training it again from its checkpoint" in err
    assert _validation(run) == expected


def _limited(limit: int, argv: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI in a process that cannot write files larger than ``limit`` bytes (a full disk, portably)."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "bayes_polar.cli", *argv], capture_output=True, text=True,
                          preexec_fn=preexec, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_a_failed_cache_write_only_warns(tmp_path, data_dir):
    cache = tmp_path / "cache"
    done = _limited(60_000, ["fit", "--out", str(tmp_path / "run"), "--data-dir", str(data_dir), "--cache-dir",
                             str(cache), *TINY])
    assert done.returncode == 0, done.stderr
    assert "bayes-polar: warning: could not write the prefix cache" in done.stderr and "File too large" in done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_full_disk_in_run_dir_is_one_line_and_loses_nothing(tmp_path, data_dir):
    run = tmp_path / "run"
    argv = ["fit", "--out", str(run), "--data-dir", str(data_dir), *TINY]
    done = _limited(10_000, argv)  # config.json fits, the first checkpoint's state does not
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bayes-polar: error: File too large"), done.stderr
    assert "--resume" in lines[0]
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list((run / "checkpoints").glob("step-*"))
    assert main([*argv, "--resume"]) == 0
