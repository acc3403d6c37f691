"""``bayes-polar fit`` under torchrun: 2 CPU processes (gloo) on the tiny random Llama.

Three launches of the real CLI (``ddp_worker.py`` saves each rank's trained tensors afterwards):
a straight 6-step run (checkpoints at steps 3 and 6), a 3-step run, and that run resumed to 6
steps. Each rank trains on batch b = 2, so the global batch is 4; the reference is one process
with batch 4 over the same 8 examples (the ranks' shards of a global batch are its batch).

Tolerances, 2 processes vs 1 (float32; reduction order and per-rank padding differ): adapters
(X, Y, Θ) max |Δ| <= 1e-6 (measured <= 2.4e-7 after 6 steps); guide max |Δ| <= 2e-4 (measured
<= 3.8e-5: Adam at head_lr 5e-2 magnifies the relative difference in the near-zero gradients of
the off-diagonal Cholesky entries); per-step ELBO relative 1e-5. Between ranks, and between a
resumed and an uninterrupted multi-process run: bitwise equal.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bayes_polar.training.checkpoint import load_checkpoint
from bayes_polar.run import build_pipeline
from bayes_polar.training.loop import epoch_loader, fit, warm_prefix_cache

from .test_fit import tiny_config

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("ddp_worker.py")
OPTIONS = dict(model="tiny-random-llama", task="arc_easy", train_limit=8, eval_limit=4, batch_size=2, layers="-1",
               rank=4, alpha=8, threads=1, max_length=96, eval_batch_size=8, predictive_samples=16, warmup_steps=2,
               lr=5e-3, head_lr=5e-2, schedule="constant", elbo="mc", num_particles=4)
ADAPTER_ATOL, GUIDE_ATOL, ELBO_RTOL = 1e-6, 2e-4, 1e-5


def torchrun(data_dir, dump: Path, out: Path, *flags: str, **options) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ddp_worker.py DUMP fit --out OUT ...`` (a free port)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", BAYES_POLAR_DATA=str(data_dir))
    values = {**OPTIONS, **options}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(dump), "fit", f"--out={out}", "--quiet", *flags, *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def ranks(dump: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(dump / f"rank{r}.safetensors") for r in (0, 1)]


def max_diff(a: dict, b: dict, prefix: str) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if k.startswith(prefix))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("ddp")
    succeeded(torchrun(data_dir, root / "straight", root / "B", steps=6, checkpoint_every=3))
    succeeded(torchrun(data_dir, root / "first", root / "A", steps=3, checkpoint_every=0))
    succeeded(torchrun(data_dir, root / "resumed", root / "A", "--resume", steps=6, checkpoint_every=0))
    return root


@pytest.fixture(scope="module")
def one_process(data_dir):
    """One process, batch 4 = the global batch: tensors after 3 and 6 steps, and the ELBO trace."""
    config = tiny_config(data_dir, **{**OPTIONS, "batch_size": 4, "steps": 6, "checkpoint_every": 0})
    pipe = build_pipeline(config)
    warm_prefix_cache(pipe.method, pipe.train, pipe.tokenizer, config.eval_batch_size)
    states, trace = {}, []

    def callback(step, logs):
        trace.append(logs["elbo"])
        states[step] = {k: v.clone() for k, v in pipe.method.state_tensors().items()}  # adapter tensors are live

    fit(pipe.method, epoch_loader(pipe.train, pipe.tokenizer, 4, config.seed), 6, callback=callback)
    return states, trace


def test_ranks_hold_bitwise_identical_parameters(runs):
    for name in ("straight", "first", "resumed"):
        rank0, rank1 = ranks(runs / name)
        assert rank0.keys() == rank1.keys()
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (name, key)


def test_two_processes_match_one_process_with_the_same_global_batch(runs, one_process):
    states, trace = one_process
    for name, step in (("first", 3), ("straight", 6)):
        got = ranks(runs / name)[0]
        assert got.keys() == states[step].keys()
        assert max_diff(got, states[step], "adapter.") <= ADAPTER_ATOL, name
        assert max_diff(got, states[step], "head.") <= GUIDE_ATOL, name
    logged = json.loads((runs / "B" / "metrics.json").read_text())["elbo_trace"]
    assert logged == pytest.approx(trace, rel=ELBO_RTOL)  # the logged ELBO is the global batch's


def test_stiefel_factors_stay_orthonormal(runs):
    factors = {k: v for k, v in ranks(runs / "straight")[0].items() if k.endswith(("polar_X", "polar_Y"))}
    assert len(factors) == 4
    for key, x in factors.items():
        gram = x.transpose(-1, -2) @ x
        assert torch.linalg.matrix_norm(gram - torch.eye(gram.shape[-1])) < 1e-5, key


def test_a_checkpoint_written_under_ddp_resumes_under_ddp_exactly(runs):
    straight, resumed = ranks(runs / "straight"), ranks(runs / "resumed")
    for rank in (0, 1):
        for key in straight[rank]:
            assert torch.equal(straight[rank][key], resumed[rank][key]), (rank, key)
    traces = [json.loads((runs / run / "metrics.json").read_text())["elbo_trace"] for run in ("B", "A")]
    assert traces[0] == traces[1] and len(traces[0]) == 6
    tensors, state, step = load_checkpoint(runs / "A")
    assert step == 6 and state["world_size"] == 2 and len(state["rank_rng"]) == 2
    for key, value in tensors.items():  # rank 0 wrote the checkpoint: it holds the trained tensors
        assert torch.equal(value, resumed[0][key]), key


def test_rank_zero_alone_writes_the_run_directory(runs):
    run = runs / "B"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluations"]["arc_easy/validation"]["n"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-00000003", "step-00000006"]
    assert (run / "adapters.safetensors").exists() and (run / "head.safetensors").exists()


def test_an_error_on_rank_zero_stops_every_rank(runs, data_dir):
    result = torchrun(data_dir, runs / "unused", runs / "B", steps=6)  # B exists: rank 0 refuses, nobody hangs
    assert result.returncode != 0
    assert result.stderr.count("pass --overwrite") == 2, result.stderr[-3000:]  # both ranks report rank 0's error
