"""Kill ``bayes-polar fit`` with SIGKILL mid-run, resume it with ``--resume``: the same result as a run never killed.

Each run is a real process. The plain case kills as soon as the first checkpoint appears; the
others stop the process at a chosen point (in the middle of writing a checkpoint, after the last
checkpoint while it evaluates) by pausing it there, so the SIGKILL lands exactly there.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from bayes_polar.cli import main

pytestmark = pytest.mark.integration
STEPS = 12

# Imported by the paused variants: holds the process at KILL_AT and says so in KILL_FLAG.
PAUSE = '''
import os, sys, time
from pathlib import Path

import bayes_polar.training.checkpoint as ck
from bayes_polar.cli import main

flag, where = Path(os.environ["KILL_FLAG"]), os.environ["KILL_AT"]


def pause():
    flag.write_text(where)
    time.sleep(3600)


if where == "mid-checkpoint":  # half of tensors.safetensors of the step-3 checkpoint is on disk
    write = ck._write_synced

    def _write_synced(path, data):
        if path.parent.name.startswith(".tmp-step-00000003") and path.name == ck.TENSORS:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            pause()
        write(path, data)

    ck._write_synced = _write_synced
elif where == "before-latest":  # step-00000003/ is published but latest.json still names step 2
    atomic = ck.atomic_write_json

    def atomic_write_json(path, obj, **kwargs):
        if Path(path).name == ck.LATEST and obj.get("step") == 3:
            pause()
        return atomic(path, obj, **kwargs)

    ck.atomic_write_json = atomic_write_json

sys.exit(main(sys.argv[1:]))
'''


def _args(data_dir, out) -> list[str]:
    return ["fit", "--out", str(out), "--model", "tiny-random-llama", "--data-dir", str(data_dir), "--task", "arc_easy",
            "--train-limit", "20", "--eval-limit", "8", "--steps", str(STEPS), "--batch-size", "4", "--layers=-1",
            "--rank", "4", "--alpha", "8", "--elbo", "mc", "--num-particles", "4", "--checkpoint-every", "1",
            "--max-length", "96", "--eval-batch-size", "8", "--predictive-samples", "32", "--warmup-steps", "2",
            "--lr", "5e-3", "--head-lr", "5e-2", "--threads", "1", "--quiet"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "bayes_polar.cli", *args], capture_output=True, text=True,
                          timeout=600, env=_env(), **kwargs)
    assert done.returncode == 0, done.stderr
    return done


def _start(command: list[str], log, **env) -> subprocess.Popen:
    with open(log, "w") as stderr:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=_env(**env))


def _wait_then_kill(process: subprocess.Popen, ready, what: str, log, timeout: float = 300) -> None:
    """Poll ``ready()`` every 5 ms; then SIGKILL the process (it must still be running)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"bayes-polar fit ended (code {process.returncode}) before {what}: {log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def _latest_step(run) -> int | None:
    try:
        return json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def _assert_same_result(reference, run) -> None:
    for name in ("adapters.safetensors", "head.safetensors", "predictions.safetensors"):
        expected, got = load_file(reference / name), load_file(run / name)
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}: {key}"
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (reference, run))
    expected["train"].pop("seconds"), got["train"].pop("seconds")
    assert got == expected
    assert json.loads((run / "config.json").read_text()) == json.loads((reference / "config.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The run never killed."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _run(_args(data_dir, run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == STEPS and len(metrics["elbo_trace"]) == STEPS
    return run


def test_sigkill_after_the_first_checkpoint_then_resume(tmp_path, data_dir, reference, capsys):
    run = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    process = _start([sys.executable, "-m", "bayes_polar.cli", *_args(data_dir, run)], log)
    _wait_then_kill(process, lambda: _latest_step(run) is not None, "first checkpoint", log)
    killed_at = _latest_step(run)
    assert killed_at < STEPS and not (run / "metrics.json").exists()

    # without --resume the killed run is left alone
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(_args(data_dir, run)) == 1
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before

    done = _run([*_args(data_dir, run), "--resume"])
    assert f"resuming from {run / 'checkpoints'}/step-{killed_at:08d} at step {killed_at}" in done.stdout
    _assert_same_result(reference, run)


@pytest.mark.parametrize("where", ["mid-checkpoint", "before-latest"])
def test_sigkill_while_a_checkpoint_is_written_then_resume(tmp_path, data_dir, reference, where):
    run, flag = tmp_path / "run", tmp_path / "paused"
    (tmp_path / "pause.py").write_text(PAUSE)
    log = tmp_path / "stderr.txt"
    process = _start([sys.executable, str(tmp_path / "pause.py"), *_args(data_dir, run)], log,
                     KILL_AT=where, KILL_FLAG=str(flag))
    _wait_then_kill(process, flag.exists, f"the pause at {where}", log)
    assert _latest_step(run) == 2  # latest.json still names the last complete checkpoint
    if where == "mid-checkpoint":
        assert list((run / "checkpoints").glob(".tmp-step-00000003-*/tensors.safetensors"))
    else:
        assert (run / "checkpoints" / "step-00000003" / "manifest.json").exists()

    done = _run([*_args(data_dir, run), "--resume"])
    assert "resuming from" in done.stdout and "step-00000002 at step 2" in done.stdout
    assert not list((run / "checkpoints").glob(".tmp-*")), "the half-written checkpoint is cleaned up"
    _assert_same_result(reference, run)


def test_sigkill_while_evaluating_after_the_last_checkpoint(tmp_path, data_dir, reference):
    run = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    process = _start([sys.executable, "-m", "bayes_polar.cli", *_args(data_dir, run)], log)
    _wait_then_kill(process, lambda: _latest_step(run) == STEPS, "the last checkpoint", log)
    assert not (run / "metrics.json").exists()
    done = _run([*_args(data_dir, run), "--resume"])
    assert f"at step {STEPS}" in done.stdout
    _assert_same_result(reference, run)
