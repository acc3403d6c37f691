"""One writer per RUN_DIR: real processes race for one directory; the loser gets one line naming the holder."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bayes_polar.cli import main
from bayes_polar.training.lock import LOCK, RunLock

pytestmark = pytest.mark.integration
TINY = ["--model", "tiny-random-llama", "--threads", "1", "--quiet", "--layers=-1", "--rank", "2",
        "--train-limit", "16", "--eval-limit", "8", "--batch-size", "4"]


def _spawn(run, *args):
    return subprocess.Popen([sys.executable, "-m", "bayes_polar.cli", "fit", "--out", str(run), *TINY, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _holder_pid(run, proc, timeout=120.0) -> int:
    """Wait until ``proc`` holds ``run``'s lock and is past its first checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (run / "checkpoints" / "latest.json").exists():
            return int((run / LOCK).read_text())
        time.sleep(0.1)
    raise AssertionError("the first fit never wrote a checkpoint")


def _refused(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith("bayes-polar: warning:")]
    assert len(lines) == 1 and lines[0].startswith("bayes-polar: error: "), err
    return lines[0]


def test_a_second_writer_is_refused_while_a_fit_holds_run_dir(capsys, tmp_path, data_dir):
    run = tmp_path / "run"
    first = _spawn(run, "--data-dir", str(data_dir), "--steps", "100000", "--checkpoint-every", "1", "--seed", "0")
    try:
        pid = _holder_pid(run, first)
        assert pid == first.pid
        for extra in ([], ["--overwrite"], ["--resume"]):
            line = _refused(capsys, ["fit", "--out", str(run), "--data-dir", str(data_dir), *TINY, "--steps", "50",
                                     "--seed", "1", *extra])
            assert f"is in use by another bayes-polar process (PID {first.pid})" in line, (extra, line)
        line = _refused(capsys, ["evaluate", str(run), "--task", "arc_easy", "--limit", "4"])
        assert f"PID {first.pid}" in line
        assert first.poll() is None, "the first fit must be untouched"
        assert json.loads((run / "config.json").read_text())["seed"] == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    RunLock(run).release()  # the kernel released the dead holder's lock


def test_two_fits_started_together_one_wins(tmp_path, data_dir):
    run = tmp_path / "run"
    procs = [_spawn(run, "--data-dir", str(data_dir), "--steps", "40", "--checkpoint-every", "1", "--seed", str(s))
             for s in (0, 1)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 1], results
    winner, loser = (results[0], results[1]) if results[0][2] == 0 else (results[1], results[0])
    last = loser[1].strip().splitlines()[-1]
    assert last.startswith("bayes-polar: error: ") and "Traceback" not in loser[1], loser[1]
    assert "in use by another bayes-polar process" in last or "exists and is not empty" in last, last
    seed = procs[[r[2] for r in results].index(0)].args[-1]
    assert json.loads((run / "config.json").read_text())["seed"] == int(seed)
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 40
