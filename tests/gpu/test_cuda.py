"""The CUDA path: a bfloat16 backbone on the GPU (fit, evaluate, resume) and 2-process NCCL.

Marked ``gpu`` and skipped where torch finds no CUDA device (CI has none): run them on a GPU
machine with ``python -m pytest -m gpu tests/gpu``.
"""
import json

import pytest
import torch

from bayes_polar.run import evaluate_run, load_run, run_fit

from integration.test_fit import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fit_evaluate_resume_on_cuda_in_bfloat16(tmp_path, data_dir):
    config = tiny_config(data_dir, device="cuda", dtype="bfloat16", steps=6, checkpoint_every=3)
    metrics = run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    assert metrics["backbone"] == {"device": "cuda:0", "dtype": "bfloat16"}
    pipe = load_run(tmp_path / "run")
    assert pipe.model.get_input_embeddings().weight.is_cuda
    for name, tensor in pipe.method.state_tensors().items():
        if name.startswith("adapter."):
            assert tensor.dtype == torch.float32, name
    added = evaluate_run(tmp_path / "run", "arc_challenge", data_dir=data_dir, limit=8, log=lambda *_: None)
    assert added["n"] == 8 and 0 <= added["acc"] <= 1
    on_cpu = load_run(tmp_path / "run", device="cpu")
    assert not on_cpu.model.get_input_embeddings().weight.is_cuda

    resumed = run_fit(config, tmp_path / "run", resume=True, progress=False, log=lambda *_: None)
    assert resumed["train"]["steps"] == 6  # the final checkpoint is found and nothing is retrained
    assert resumed["evaluations"]["arc_easy/validation"] == metrics["evaluations"]["arc_easy/validation"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_processes_over_nccl(tmp_path, data_dir):
    from integration.test_distributed import ranks, succeeded, torchrun

    succeeded(torchrun(data_dir, tmp_path / "dump", tmp_path / "run", steps=4, checkpoint_every=2, device="cuda"))
    rank0, rank1 = ranks(tmp_path / "dump")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["backbone"]["device"] == "cuda:0"
