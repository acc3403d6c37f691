"""Where the frozen backbone runs and in which precision: ``--device`` and ``--dtype``.

The backbone may be float32, bfloat16 or float16 on the CPU or a CUDA device; PoLAR factors
X, Y, Θ stay float32 (QR retractions and orthonormality need it, see
:func:`bayes_polar.adapters.layer.adapter_dtype`), features are cast to float32 and the last
layer lives on the CPU in float32 (:mod:`bayes_polar.data.features`).
"""
from __future__ import annotations

import os
import re
import warnings

import torch

from ..errors import BayesPolarWarning, ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# CPU instruction sets that multiply in a half-precision dtype natively (torch.cpu.get_capabilities()
# names); without one, oneDNN converts to float32 around every matmul (6.3x float32's time measured
# for a bfloat16 (512, 576) x (576, 1536) matmul on an AVX2 AMD EPYC, 1 thread)
NATIVE_CPU_SUPPORT = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


def check_device(spec: str) -> str:
    """``spec`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a :class:`ConfigError` otherwise."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def resolve_device(spec: str = "auto") -> torch.device:
    """The backbone's device for ``spec``.

    ``auto``: CUDA when available, else the CPU. ``cuda`` (or ``auto`` with CUDA) under torchrun
    is ``cuda:LOCAL_RANK``, so each process gets its own GPU. ``cuda``/``cuda:N`` without such a
    device is a :class:`ConfigError`.
    """
    check_device(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} needs a CUDA GPU, and torch {torch.__version__} finds none "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")
    index = int(spec.partition(":")[2]) if ":" in spec else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible "
                          f"(cuda:{index} asked for)")
    return torch.device("cuda", index)


def resolve_dtype(name: str) -> torch.dtype:
    """``torch.float32`` / ``bfloat16`` / ``float16`` for its name; a :class:`ConfigError` otherwise."""
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def emulated_on_cpu(dtype: torch.dtype, capabilities: dict | None = None) -> bool:
    """Whether this CPU lacks native matmuls in ``dtype`` (bfloat16 / float16; float32 is always native).

    ``capabilities``: :func:`torch.cpu.get_capabilities` (default: this machine's).
    """
    if dtype not in NATIVE_CPU_SUPPORT:
        return False
    capabilities = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return not any(capabilities.get(flag) for flag in NATIVE_CPU_SUPPORT[dtype])


def move_backbone(model, device: torch.device, dtype: torch.dtype):
    """``model`` in ``dtype`` on ``device`` (cast first: a bfloat16 copy never passes through float32).

    Running out of GPU memory is a :class:`ConfigError` naming the model's size and the device's
    free memory (sharding one model over several GPUs is not supported). A half-precision backbone
    on a CPU without native support for it (:func:`emulated_on_cpu`) runs, with a warning: it is
    several times slower than float32 there.
    """
    if device.type == "cpu" and emulated_on_cpu(dtype):
        name = str(dtype).removeprefix("torch.")
        flags = " or ".join(f.upper().replace("_", "-") for f in NATIVE_CPU_SUPPORT[dtype])
        warnings.warn(f"this CPU has no native {name} matmuls (no {flags}): a {name} backbone is emulated and "
                      f"several times slower than float32 here (6x measured on an AVX2 CPU); --dtype float32 is "
                      "faster on this machine", BayesPolarWarning, stacklevel=2)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    try:
        return model.to(device=device)
    except torch.OutOfMemoryError:
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        free, total = torch.cuda.mem_get_info(device)
        model.to("cpu")
        raise ConfigError(f"the backbone ({size:.1f} GiB in {str(dtype).removeprefix('torch.')}) does not fit on "
                          f"{device}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free. Use --dtype bfloat16, a "
                          "GPU with more memory, or a smaller model (one model is not sharded over GPUs)") from None
