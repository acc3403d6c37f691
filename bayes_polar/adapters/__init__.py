"""Stage 2, adapters: PoLAR (X Θ Yᵀ on Stiefel factors) and the peft LoRA baseline for causal LMs.

Usage::

    inject_polar(model, rank=8, layers=[-4, -3, -2, -1])
    optimizer = make_adapter_optimizer(model, "riemannian_adam", lr=1e-3)
"""
from .architectures import SUPPORTED_MODEL_TYPES, default_target_modules
from .config import PolarConfig
from .diagnostics import (
    adapter_diagnostics,
    assert_orthogonal,
    layer_stable_rank,
    orthogonality_error,
    stable_rank,
)
from .inject import find_blocks, find_target_modules, inject_polar
from .io import adapter_state_dict, load_adapters, save_adapters
from .layer import PolarLinear
from .lora import inject_lora
from .modules import adapter_layers, adapters_disabled, lora_layers, merge_adapters, polar_layers, unmerge_adapters
from .optim import (
    LANDING_TOLERANCE,
    OPTIMIZERS,
    LandingAdamW,
    RiemannianAdam,
    landing_field,
    make_adapter_optimizer,
    param_groups,
)

__all__ = [
    "LANDING_TOLERANCE",
    "OPTIMIZERS",
    "LandingAdamW",
    "PolarConfig",
    "PolarLinear",
    "RiemannianAdam",
    "SUPPORTED_MODEL_TYPES",
    "adapter_diagnostics",
    "adapter_layers",
    "adapters_disabled",
    "adapter_state_dict",
    "assert_orthogonal",
    "default_target_modules",
    "find_blocks",
    "find_target_modules",
    "inject_lora",
    "inject_polar",
    "landing_field",
    "layer_stable_rank",
    "load_adapters",
    "lora_layers",
    "make_adapter_optimizer",
    "merge_adapters",
    "orthogonality_error",
    "param_groups",
    "polar_layers",
    "save_adapters",
    "stable_rank",
    "unmerge_adapters",
]
