"""bayes_polar.training.distributed: a no-op in one process; its collectives on 2 gloo processes (torchrun)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bayes_polar.training import distributed as ddp
from bayes_polar.training.checkpoint import load_checkpoint
from bayes_polar.errors import ConfigError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_one_process_is_world_size_one(single_process):
    ctx = ddp.init_distributed()
    assert ctx == ddp.DistributedContext() and not ctx.enabled and ctx.is_main
    assert not torch.distributed.is_initialized()
    assert ddp.shard() == (1, 0) and ddp.is_main()


def test_one_process_collectives_change_nothing(single_process):
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = grad = torch.ones(2)
    ddp.average_gradients_([p])
    assert p.grad is grad and torch.equal(grad, torch.ones(2))
    logs = {"elbo": -1.5}
    assert ddp.mean_logs(logs) is logs
    t = torch.ones(2)
    ddp.broadcast_([t])
    assert torch.equal(t, torch.ones(2))
    assert ddp.on_main(lambda x: x + 1, 1) == 2
    ddp.check_in_sync({"x": torch.ones(1)})


def test_one_process_checkpoint_state_is_unchanged(single_process, tmp_path):
    ddp.save_checkpoint(tmp_path, {"w": torch.ones(2)}, {"step": 3}, step=3)
    _, state, step = load_checkpoint(tmp_path)
    assert state == {"step": 3} and step == 3


def test_resume_needs_the_same_number_of_processes(single_process):
    ddp.restore_rank_state({"step": 3})  # written by one process (no world_size): fine
    with pytest.raises(ConfigError, match="--nproc_per_node 2"):
        ddp.restore_rank_state({"step": 3, "world_size": 2})


def test_only_fit_and_demo_run_under_torchrun(monkeypatch, capsys):
    from bayes_polar.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["tasks"]) == 2
    assert "only fit and demo" in capsys.readouterr().err


def test_collectives_on_two_gloo_processes():
    script = Path(__file__).with_name("ddp_collectives.py")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # two processes share stdout: lines may interleave, so count the markers rather than lines
    assert sorted(re.findall(r"rank \d ok", result.stdout)) == ["rank 0 ok", "rank 1 ok"]
