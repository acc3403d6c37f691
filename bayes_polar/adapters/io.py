"""Save and load adapter weights (PoLAR and/or peft LoRA) as one safetensors file.

The file holds only adapter tensors, keyed by module name relative to the transformers model
(``model.layers.29.self_attn.q_proj.polar_X``; LoRA keys as in peft's
``get_peft_model_state_dict``), in their own dtype, so a round trip is bit-exact. Its metadata
holds ``format``, the PoLAR config (``polar_config``, JSON) and the LoRA settings
(``lora_config``, JSON), enough to re-inject the adapters into a fresh backbone.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterMismatchError, CheckpointError, ConfigError
from .config import PolarConfig
from .modules import adapter_layers, lora_layers, polar_layers, unwrap

FORMAT = "bayes-polar-adapters/1"


def _polar_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": p for name, layer in polar_layers(model) for key, p in layer.adapter_parameters().items()}


def _lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    if next(lora_layers(model), None) is None:
        return {}
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unwrap(model))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``model`` (detached, plain tensors), keyed as in the saved file."""
    state = {**_polar_tensors(model), **_lora_tensors(model)}
    return {key: value.detach().as_subclass(torch.Tensor) for key, value in state.items()}


def _metadata(model: nn.Module) -> dict[str, str]:
    from .lora import lora_settings

    base = unwrap(model)
    metadata = {"format": FORMAT}
    if getattr(base, "polar_config", None) is not None:
        metadata["polar_config"] = base.polar_config.to_json()
    if next(lora_layers(base), None) is not None:
        metadata["lora_config"] = json.dumps(lora_settings(base), sort_keys=True)
    return metadata


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter tensors and configs of ``model`` to ``path`` (atomically); returns the path.

    Usage::

        save_adapters(model, "runs/polar/adapters.safetensors")
        load_adapters(fresh_backbone, "runs/polar/adapters.safetensors")
    """
    from safetensors.torch import save

    state = {key: value.contiguous() for key, value in adapter_state_dict(model).items()}
    if not state:
        raise ConfigError("model carries no PoLAR or LoRA adapters: call inject_polar or inject_lora first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # Python I/O: a full disk is an OSError, not a SafetensorError
            f.write(save(state, metadata=_metadata(model)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_adapters(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a file written by :func:`save_adapters`."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {metadata.get('format')!r}, expected {FORMAT!r}")
    return tensors, metadata


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model``, in place; returns ``model``.

    A model without adapters first gets them injected from the saved configs. The file's tensor
    names and shapes must then equal the model's adapter tensors exactly, otherwise
    :class:`AdapterMismatchError` lists the missing, unexpected and mis-shaped names. Merged
    layers are refused (``unmerge_adapters`` first), since their base weights hold the old ΔW.
    """
    tensors, metadata = read_adapters(path)
    _inject_missing(model, metadata)
    expected = adapter_state_dict(model)
    check_manifest(expected, tensors, path)
    merged = [name for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise ConfigError(f"Adapters of {merged[:3]} are merged: call unmerge_adapters(model) before load_adapters")
    _copy_in(model, tensors)
    return model


def _inject_missing(model: nn.Module, metadata: dict[str, str]) -> None:
    from .inject import inject_polar
    from .lora import inject_lora_settings

    base = unwrap(model)
    if "polar_config" in metadata and next(polar_layers(base), None) is None:
        inject_polar(base, config=PolarConfig.from_json(metadata["polar_config"]))
    if "lora_config" in metadata and next(lora_layers(base), None) is None:
        inject_lora_settings(base, json.loads(metadata["lora_config"]))


def check_manifest(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path="file") -> None:
    """Raise :class:`AdapterMismatchError` unless ``found`` has exactly the names and shapes of ``expected``."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = [
        f"{key}: file {tuple(found[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & found.keys())
        if found[key].shape != expected[key].shape
    ]
    problems = [f"{label} ({len(items)}): {items[:3]}" for label, items in
                (("missing in file", missing), ("not in model", unexpected), ("shape mismatch", shapes)) if items]
    if problems:
        raise AdapterMismatchError(f"{path} does not fit this model's adapters; " + "; ".join(problems))


@torch.no_grad()
def _copy_in(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    polar = _polar_tensors(model)
    for key, parameter in polar.items():
        parameter.copy_(tensors[key])
    lora = {key: value for key, value in tensors.items() if key not in polar}
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(unwrap(model), lora)
