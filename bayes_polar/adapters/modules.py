"""Find adapter layers in a model (PoLAR and peft LoRA) and merge/unmerge them as a whole."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import nn

from ..errors import BayesPolarWarning, ConfigError
from .layer import PolarLinear


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel``; any other model is returned as it is.

    Module names used by this package (targets, saved keys, diagnostics) are relative to it, so a
    model and the same model wrapped by ``get_peft_model`` name their layers the same way.
    """
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def is_adapter_layer(module: nn.Module) -> bool:
    """A PolarLinear or any peft tuner layer (LoRA, IA3, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, (PolarLinear, BaseTunerLayer))


def polar_layers(model: nn.Module) -> Iterator[tuple[str, PolarLinear]]:
    """``(name, layer)`` for every :class:`PolarLinear`, names relative to :func:`unwrap` (model)."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, PolarLinear):
            yield name, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every peft LoRA layer, names relative to :func:`unwrap` (model)."""
    for name, module in unwrap(model).named_modules():
        if is_lora_layer(module):
            yield name, module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """PoLAR layers, then LoRA layers."""
    yield from polar_layers(model)
    yield from lora_layers(model)


def merge_adapters(model: nn.Module) -> list[str]:
    r"""Fold every adapter into its base weight, :math:`W_0 \leftarrow W_0 + \Delta W`; returns the names.

    Layers that are already merged are skipped with a :class:`BayesPolarWarning`.
    """
    return [name for name, layer in adapter_layers(model) if _toggle(name, layer, merge=True)]


def unmerge_adapters(model: nn.Module) -> list[str]:
    r"""Undo :func:`merge_adapters`, :math:`W_0 \leftarrow W_0 - \Delta W` (exact up to float rounding)."""
    return [name for name, layer in adapter_layers(model) if _toggle(name, layer, merge=False)]


def _toggle(name: str, layer: nn.Module, merge: bool) -> bool:
    if bool(layer.merged) == merge:
        state = "merged" if merge else "not merged"
        warnings.warn(f"{name} is already {state}; left as it is", BayesPolarWarning, stacklevel=3)
        return False
    if merge:
        layer.merge()
    else:
        layer.unmerge()
    return True


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block every adapter contributes ΔW = 0 (Θ = 0 for PoLAR, B = 0 for LoRA): the base model.

    Parameters are zeroed in place and restored exactly on exit; merged layers are refused.
    """
    saved = []
    for name, layer in adapter_layers(model):
        if layer.merged:
            raise ConfigError(f"{name} is merged: unmerge_adapters(model) before disabling adapters")
        tensors = [layer.polar_theta] if isinstance(layer, PolarLinear) else list(layer.lora_B.parameters())
        saved.extend((t, t.detach().clone()) for t in tensors)
    try:
        with torch.no_grad():
            for tensor, _ in saved:
                tensor.zero_()
        yield model
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
