"""Decoder families bayes-polar supports, and each one's default adapter targets.

Injection, the prefix cache, both answer formats and export need only what transformers' causal
LMs share: ``get_decoder()`` returning a decoder whose blocks sit in one ``nn.ModuleList`` (found by
:func:`~bayes_polar.adapters.inject.find_blocks`), a forward taking ``inputs_embeds``,
``position_ids``, ``attention_mask`` and ``cache``, and ``get_output_embeddings()``. The families
below are tested on tiny random-init configs (``tests/integration/test_architectures.py``). Only
the names of their attention projections differ, so each gets the default ``target_modules`` peft
uses for it (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``): query and value, fused into
one ``qkv_proj`` (Phi-3) or ``query_key_value`` (GPT-NeoX) where the family fuses them.

Family quirks handled elsewhere: Gemma 2/3's final logit soft-capping is applied by
:func:`~bayes_polar.data.features.lm_logits` (the options format's log-likelihood features); their
sliding-window layers and Gemma's scaled embeddings are inside transformers' own decoder, so the
prefix cache needs nothing of its own; so are Qwen3's query/key norms.

A model of another family can still be adapted when its blocks are found: pass ``target_modules``
explicitly. Only asking for the default targets, or a decoder whose blocks cannot be found, raises
:class:`~bayes_polar.errors.UnsupportedArchitectureError` (it lists the families below).
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError

# model_type -> (family, default target_modules); Qwen2.5 reports model_type "qwen2"
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": ("Llama", ("q_proj", "v_proj")),
    "mistral": ("Mistral", ("q_proj", "v_proj")),
    "qwen2": ("Qwen2 / Qwen2.5", ("q_proj", "v_proj")),
    "qwen3": ("Qwen3", ("q_proj", "v_proj")),
    "gemma": ("Gemma", ("q_proj", "v_proj")),
    "gemma2": ("Gemma 2", ("q_proj", "v_proj")),
    "gemma3_text": ("Gemma 3 (text, Gemma3ForCausalLM)", ("q_proj", "v_proj")),
    "phi3": ("Phi-3", ("qkv_proj",)),
    "gpt_neox": ("GPT-NeoX (Pythia)", ("query_key_value",)),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
AUTO = "auto"  # FitConfig.target_modules: the family's default


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` (``llama``, ``gpt_neox``, ...), or None for a model without one."""
    return getattr(getattr(model, "config", None), "model_type", None)


def supported_families() -> str:
    """``llama (Llama), mistral (Mistral), ...``: the model types and families, for error messages."""
    return ", ".join(f"{kind} ({family})" for kind, (family, _) in FAMILIES.items())


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """The default ``target_modules`` of the model's family (``("q_proj", "v_proj")`` for Llama).

    Raises
    ------
    UnsupportedArchitectureError
        The model's type has no default; the message lists the supported families and the model's
        linear layer names, to pass as ``target_modules`` instead.
    """
    kind = model_type(model)
    if kind in FAMILIES:
        return FAMILIES[kind][1]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise UnsupportedArchitectureError(
        f"No default target_modules for model type {kind!r} ({type(model).__name__}); supported families: "
        f"{supported_families()}. Pass target_modules explicitly (--target-modules), e.g. from its linear "
        f"layers: {', '.join(linear[:12]) or 'none'}"
    )


def resolve_target_modules(model: nn.Module, target_modules):
    """``target_modules`` as given, or the family's default when it is None or ``"auto"``."""
    if target_modules is None or target_modules == AUTO:
        return default_target_modules(model)
    return target_modules
