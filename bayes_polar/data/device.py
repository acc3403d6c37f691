"""Where the frozen backbone runs and in which precision: ``--device`` and ``--dtype``.

The backbone may be float32, bfloat16 or float16 on the CPU or a CUDA device; PoLAR factors
X, Y, Θ stay float32 (QR retractions and orthonormality need it, see
:func:`bayes_polar.adapters.layer.adapter_dtype`), features are cast to float32 and the last
layer lives on the CPU in float32 (:mod:`bayes_polar.data.features`).
"""
from __future__ import annotations

import os
import re

import torch

from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


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


def move_backbone(model, device: torch.device, dtype: torch.dtype):
    """``model`` in ``dtype`` on ``device`` (cast first: a bfloat16 copy never passes through float32).

    Running out of GPU memory is a :class:`ConfigError` naming the model's size and the device's
    free memory (sharding one model over several GPUs is not supported).
    """
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
