"""Device and precision of the backbone: option checks, resolution, and a bfloat16 backbone end to end."""
import pytest
import torch

from bayes_polar.config import FitConfig
from bayes_polar.data.device import check_device, move_backbone, resolve_device, resolve_dtype
from bayes_polar.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_device_specs(spec):
    assert check_device(spec) == spec


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "CPU", "mps", "", "cuda:0,1"])
def test_invalid_device_specs_are_config_errors(spec):
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        check_device(spec)
    with pytest.raises(ConfigError, match="device must be"):
        FitConfig(model="tiny-random-llama", device=spec)


def test_dtype_names():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    with pytest.raises(ConfigError, match="dtype must be one of"):
        resolve_dtype("fp8")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        FitConfig(model="tiny-random-llama", dtype="half")


def test_cpu_is_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_auto_without_cuda_is_the_cpu():
    assert resolve_device("auto") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_says_so(spec):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        resolve_device(spec)


@gpu
@needs_cuda
def test_cuda_follows_local_rank_under_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    assert resolve_device("auto") == torch.device("cuda", torch.cuda.device_count() - 1)
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device("cuda")


def test_move_backbone_casts_without_a_float32_detour():
    from bayes_polar.data.backbone import tiny_random_llama

    model, _ = tiny_random_llama()
    moved = move_backbone(model, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in moved.parameters()} == {torch.bfloat16}


def test_half_precision_on_a_cpu_without_native_support_warns_and_still_runs(monkeypatch):
    """bfloat16 matmuls are emulated (6x float32's time) on CPUs without AVX512-BF16 / AMX: say so."""
    import warnings

    from bayes_polar.data.backbone import tiny_random_llama
    from bayes_polar.data.device import emulated_on_cpu
    from bayes_polar.errors import BayesPolarWarning

    assert emulated_on_cpu(torch.bfloat16, {"avx2": True}) and emulated_on_cpu(torch.float16, {"avx512_bf16": True})
    assert not emulated_on_cpu(torch.bfloat16, {"avx512_bf16": True}) and not emulated_on_cpu(torch.bfloat16, {"amx_bf16": True})
    assert not emulated_on_cpu(torch.float32, {})
    model, _ = tiny_random_llama()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    with pytest.warns(BayesPolarWarning, match="no native bfloat16 matmuls.*--dtype float32"):
        moved = move_backbone(model, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in moved.parameters()} == {torch.bfloat16}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        move_backbone(model, torch.device("cpu"), torch.bfloat16)
        move_backbone(model, torch.device("cpu"), torch.float32)
    assert not [w for w in caught if issubclass(w.category, BayesPolarWarning)]
