"""Export a finished run for use without bayes-polar's training code.

``export_run(run_dir, out)`` (``bayes-polar export RUN_DIR --out DIR``) writes

- ``model/``: the backbone with the adapters folded into plain ``nn.Linear`` weights
  (:func:`merge_and_unload`), saved by ``save_pretrained`` with its tokenizer: it loads with
  ``AutoModelForCausalLM.from_pretrained`` (no missing keys) and gives the adapted model's logits;
  both are checked before the export is kept;
- ``head/``: the last layer (``head.safetensors``: the posterior mean and covariance factors, the
  Laplace posterior or the point weights; the zero-shot head) and ``head.json`` (the feature recipe,
  class layout, covariance convention and feature normalisation);
- ``peft/`` (LoRA methods): a peft adapter folder for ``PeftModel.from_pretrained(base, folder)``;
- ``README.md``: a short model card. Ensembles write one such set per member under ``members/<m>/``.
"""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from .adapters.modules import adapter_layers, lora_layers, unwrap
from .errors import BayesPolarError, ConfigError
from .training.checkpoint import atomic_write_json

LOGIT_TOLERANCE = 1e-4
PROBE_TEXTS = ("Question: Which gas do plants take in?\nAnswer: carbon dioxide", "Answer:")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every PoLAR/LoRA adapter into its base weight and put the plain ``nn.Linear`` back, in place.

    The result is an ordinary transformers model: ``save_pretrained`` writes ``...q_proj.weight`` (no
    ``base_layer``, no adapter tensors) and ``from_pretrained`` reloads it. Returns the model.
    """
    base = unwrap(model)
    for name, layer in list(adapter_layers(base)):
        if not layer.merged:
            layer.merge()
        linear = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, linear)
    for attribute in ("polar_config", "polar_targets", "lora_targets", "peft_config"):
        if hasattr(base, attribute):
            delattr(base, attribute)
    base._hf_peft_config_loaded = False
    return base


def export_run(run_dir, out, overwrite: bool = False, log=print) -> dict:
    """Write the exported model(s), head(s) and model card of ``run_dir`` to ``out``; returns ``export.json``."""
    from .run import load_run

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    pipe = load_run(run_dir)
    config = pipe.config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if config.method == "lora-ensemble":
        ensemble, units = pipe.method, []
        for m, member in enumerate(ensemble.members):
            ensemble.method.load_state_tensors(member)
            units.append(_export_unit(pipe, ensemble.method, tmp, f"members/{m}/"))
    else:
        units = [_export_unit(pipe, pipe.method, tmp, "")]
    record = {"run_dir": str(run_dir.resolve()), "method": config.method, "backbone": config.model,
              "format": config.format, "parts": units}
    atomic_write_json(tmp / "export.json", record)
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in adapter_layers(pipe.model)})
    (tmp / "README.md").write_text(model_card(run_dir, config, units, targets))
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    log(f"exported {run_dir} to {out} (max |logit difference| of the merged model: "
        f"{max(u['max_logit_difference'] for u in units):.2e})")
    return record


def _export_unit(pipe, method, root: Path, prefix: str) -> dict:
    """One model folder + head (+ peft folder) for ``method``'s current adapters and head, under ``root/prefix``."""
    folder = root / prefix
    folder.mkdir(parents=True, exist_ok=True)
    adapted = unwrap(pipe.model).eval()
    probe = _probe(pipe.tokenizer)
    with torch.no_grad():
        expected = adapted(**probe).logits.float()
    merged = merge_and_unload(copy.deepcopy(adapted))
    merged.config.name_or_path = str(pipe.config.model)
    merged.save_pretrained(folder / "model", safe_serialization=True)
    pipe.tokenizer.save_pretrained(folder / "model")
    difference = check_merged(folder / "model", probe, expected)
    unit = {"model": f"{prefix}model", "max_logit_difference": difference, "head": f"{prefix}head"}
    _export_head(pipe, method, folder / "head")
    if any(True for _ in lora_layers(adapted)):
        unit["peft"] = f"{prefix}peft"
        export_peft(pipe, folder / "peft")
    return unit


def _probe(tokenizer) -> dict:
    return dict(tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True))


def check_merged(folder: Path, probe: dict, expected: torch.Tensor) -> float:
    """Reload ``folder`` with plain transformers: no missing or unexpected keys, logits within tolerance."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise BayesPolarError(f"the exported model {folder} does not reload cleanly: {bad}")
    with torch.no_grad():
        got = model.eval()(**probe).logits.float()
    difference = float((got - expected).abs().max())
    if difference > LOGIT_TOLERANCE:
        raise BayesPolarError(f"the exported model {folder} gives logits {difference:.2e} away from the adapted "
                              f"model's (tolerance {LOGIT_TOLERANCE})")
    return difference


def export_peft(pipe, folder: Path) -> None:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) of the run's LoRA."""
    from peft import LoraConfig, get_peft_model

    from .adapters.lora import lora_settings
    from .data.backbone import load_backbone

    fresh, _ = load_backbone(pipe.config.model, trust_remote_code=pipe.config.trust_remote_code)
    fresh.name_or_path = str(pipe.config.model)  # what peft records as base_model_name_or_path
    settings = lora_settings(pipe.model)
    with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(fresh, LoraConfig(**settings, task_type="CAUSAL_LM",
                                                      base_model_name_or_path=str(pipe.config.model)))
    trained = dict(lora_layers(pipe.model))
    with torch.no_grad():
        for name, layer in lora_layers(peft_model):
            source = trained[name]
            for part in ("lora_A", "lora_B"):
                getattr(layer, part)["default"].weight.copy_(getattr(source, part)["default"].weight)
    peft_model.save_pretrained(folder, save_embedding_layers=False)  # LoRA only; no hub lookup of the base


def _export_head(pipe, method, folder: Path) -> None:
    """The last layer as safetensors + JSON, readable without bayes-polar."""
    from safetensors.torch import save_file

    from .training.trainable_heads import VariationalHead

    folder.mkdir(parents=True, exist_ok=True)
    config, head = pipe.config, method.head
    tensors = {"zero_shot": pipe.zero_shot}
    info = {"method": config.method, "format": config.format, "feature_dim": method.extractor.feature_dim,
            "loglik_features": bool(method.extractor.loglik_features),
            "answer_words": list(pipe.train.task.answer_words), "predictive_samples": config.predictive_samples,
            "feature_normalisation": _normalisation(config.format, method.extractor.scaling),
            "features": ("letters: the final hidden state (after the final norm) at the last prompt token; one "
                         "logit per answer word, z = W phi" if config.format == "letters" else
                         "options: per choice, the final hidden state at the last token of 'context + option' "
                         "(+ the option's summed and mean log-likelihood when loglik_features); one shared row "
                         "w, z_c = w . phi_c")}
    if method.extractor.scaling is not None:
        tensors["feature_scale"] = method.extractor.scaling.scale
    posterior = method.laplace
    if posterior is None and isinstance(head, VariationalHead):
        try:
            posterior = head.posterior()
        except ConfigError:  # a non-Gaussian guide: its own parameters
            tensors.update({f"guide.{k}": v for k, v in head.state_tensors().items()})
            info["posterior"] = "guide parameters (non-Gaussian guide; see the run's guide)"
    if posterior is not None:
        tensors["loc"] = posterior.loc
        if posterior.factor is not None:
            tensors["factor"] = posterior.factor
        if posterior.diag is not None:
            tensors["diag"] = posterior.diag
        info["posterior"] = ("Gaussian over W (rows x feature_dim): mean 'loc'; covariance "
                             + ("per row Sigma_k = F_k F_k^T" if posterior.rowwise else
                                "joint over the flattened W, Sigma = F F^T")
                             + (" + diag(diag)" if posterior.diag is not None else "")
                             + " with F = 'factor'" + (" (lower triangular)" if posterior.triangular else ""))
        info["rowwise"] = bool(posterior.rowwise)
    elif "posterior" not in info:
        tensors["weight"] = head.weight.detach()
        info["posterior"] = "point weights 'weight'; probabilities softmax(z / temperature)"
        info["temperature"] = float(head.temperature)
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, folder / "head.safetensors")
    atomic_write_json(folder / "head.json", info)


def _normalisation(format: str, scaling) -> str:
    """How extracted features become the head's input (:mod:`bayes_polar.data.normalization`), in words."""
    centring = ("options: subtract each question's mean feature over its valid choices (missing choices stay 0); "
                if format == "options" else "")
    scale = ("then divide each dimension by 'feature_scale' (its RMS on the training split)" if scaling is not None
             else "no scaling")
    return centring + scale


def model_card(run_dir: Path, config, units: list[dict], targets: list[str] | None = None) -> str:
    """The export's README.md; ``targets``: the adapted modules' short names (``--target-modules auto`` resolved)."""
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    rows = [f"| {name} | {r['acc']:.3f} | {r['ece']:.2f} | {r['nll']:.3f} |"
            for name, r in metrics.get("evaluations", {}).items()]
    table = "\n".join(["| task/split | ACC | ECE % | NLL |", "|---|---|---|---|", *rows]) if rows else "(not evaluated)"
    prefix = "members/0/" if config.method == "lora-ensemble" else ""
    peft = any("peft" in u for u in units)
    lines = [
        f"# {config.method} on {config.task}",
        "",
        f"Fine-tuned with bayes-polar from the backbone `{config.model}` (format `{config.format}`, adapters "
        f"rank {config.rank} on `{','.join(targets) if targets else config.target_modules}` in blocks `{config.layers}`, {config.steps} steps, "
        f"seed {config.seed}).",
        "",
        "## Results (from the run's metrics.json)",
        "",
        table,
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained('{prefix}model')      # adapters merged into the weights",
        f"tokenizer = AutoTokenizer.from_pretrained('{prefix}model')",
        "```",
        "",
        f"The last layer is `{prefix}head/head.safetensors`, described by `head.json` (feature recipe,"
        " posterior mean and covariance). Predictions with uncertainty, from the run directory: "
        "`bayes-polar predict RUN_DIR --input questions.jsonl` or `Predictor.from_run(RUN_DIR)`.",
    ]
    if peft:
        lines += ["", f"LoRA adapters alone: `PeftModel.from_pretrained(base_model, '{prefix}peft')`, with the base "
                  f"model `{config.model}` (bayes-polar: `load_backbone('{config.model}')`)."]
    if config.method == "lora-mcdropout":
        lines += ["", "MC dropout: the merged model is the deterministic (dropout off) network; the run's "
                  "predictive averages dropout passes of the adapters (use the peft folder in train mode)."]
    if config.method == "lora-ensemble":
        lines += ["", f"Deep ensemble: one model, head and peft folder per member under `members/<m>/`; "
                  "the predictive is the mean of the members' probabilities."]
    lines += ["", "The weights are derived from the backbone and inherit its license."]
    return "\n".join(lines) + "\n"
