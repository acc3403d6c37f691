"""The speed and memory benchmarks parse their options and stop at once when CUDA is absent."""
import importlib

import pytest
import torch

from conftest import REPO

SCRIPTS = ["train_step", "optimizer_step", "predictive", "memory", "head_cost", "prefix_cache"]


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return lambda name: importlib.import_module(name)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(benchmark, name, capsys):
    with pytest.raises(SystemExit) as done:
        benchmark(name).main(["--help"])
    assert done.value.code == 0
    assert "--device" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the GPU variant would run")
@pytest.mark.parametrize("name", SCRIPTS)
def test_gpu_variant_fails_fast_without_cuda(benchmark, name):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as done:
        benchmark(name).main(["--model", "random-llama-1b", "--device", "cuda", "--dtype", "bfloat16"])
    assert "needs a CUDA GPU" in str(done.value.code)
    assert torch.get_num_threads() == threads, "nothing ran before the check"
