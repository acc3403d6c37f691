"""Run a configuration end to end: build, train (resumable), evaluate, and write RUN_DIR.

RUN_DIR holds ``config.json`` (everything needed to rerun), ``metrics.json`` (per evaluated
task/split: acc, ece, nll, brier, n, plus the point prediction and the zero-shot model; the
adapters' stable rank and orthogonality error; the ELBO trace), ``reliability_<task>.png``,
``elbo.png``, ``adapters.safetensors``, ``head.safetensors`` and ``checkpoints/``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import adapter_diagnostics, save_adapters
from .backbone import load_backbone
from .checkpoint import (atomic_write_json, latest_checkpoint, load_checkpoint, prepare_run_dir,
                         save_checkpoint)
from .config import FitConfig
from .errors import ConfigError
from .evaluation import classification_metrics, plot_elbo_trace, reliability_diagram
from .features import FeatureExtractor, Features, answer_head_rows, extract_features
from .formats import EncodedTask, encode_task, make_loader
from .head import head_logits
from .heads import zero_shot_weights
from .methods import Method, attach_adapters, build_method, first_adapted_block, is_variational
from .prefix_cache import CachedTrunk
from .registry import load_prior
from .tasks import load_task, task_spec
from .train import epoch_loader, fit, restore_training_state, training_state, warm_prefix_cache


@dataclass
class Pipeline:
    config: FitConfig
    model: torch.nn.Module
    tokenizer: object
    train: EncodedTask
    method: Method
    zero_shot: torch.Tensor  # (K, D) head weights of the zero-shot LM


def default_split(task: str) -> str:
    files = task_spec(task).files
    return "validation" if "validation" in files else "test"


def eval_targets(config: FitConfig) -> list[tuple[str, str]]:
    """``task[:split]`` entries of ``eval_tasks``; default: the training task's validation split."""
    targets = []
    for item in (config.eval_tasks or config.task).split(","):
        name, _, split = item.strip().partition(":")
        if name:
            targets.append((name, split or default_split(name)))
    return targets


def build_pipeline(config: FitConfig, data_dir=None) -> Pipeline:
    """Backbone + adapters + features + head + steps for ``config`` (seeded)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model, tokenizer = load_backbone(config.model)
    train_task = load_task(config.task, "train", data_dir or config.data_dir, limit=config.train_limit)
    train = encode_task(train_task, tokenizer, config.format, config.max_length)
    torch.manual_seed(config.seed)
    attach_adapters(model, config)
    start = first_adapted_block(model, config)
    trunk = None
    if config.prefix_cache and start >= 1:
        trunk = CachedTrunk(model, start, getattr(torch, config.cache_dtype))
    extractor = FeatureExtractor(model, config.format, config.loglik_features, trunk)
    rows = answer_head_rows(model, train.answer_ids) if config.format == "letters" else None
    init = zero_shot_weights(config.format, extractor.feature_dim, rows, config.loglik_features)
    prior = load_prior(config.prior, **config.prior_kwargs)
    prior.attach({"zero_shot_weights": init})
    torch.manual_seed(config.seed + 1)
    method = build_method(config, model, extractor, dataset_size=len(train), num_rows=init.shape[0],
                          init=init, prior=prior)
    if is_variational(config.method):
        num_classes = max(train.num_classes, 1)
        dummy = Features(torch.zeros(1, num_classes if config.format == "options" else 1, extractor.feature_dim),
                         torch.ones(1, num_classes, dtype=torch.bool))
        method.head.setup(dummy, torch.zeros(1, dtype=torch.long))
    return Pipeline(config, model, tokenizer, train, method, init)


def encode_eval(pipe: Pipeline, task: str, split: str, data_dir=None, limit=None) -> EncodedTask:
    config = pipe.config
    encoded = encode_task(load_task(task, split, data_dir or config.data_dir, limit=limit or config.eval_limit),
                          pipe.tokenizer, config.format, config.max_length)
    if config.format == "letters" and encoded.answer_ids != pipe.train.answer_ids:
        raise ConfigError(f"{task} answers with {encoded.task.answer_words}, the head was trained on "
                          f"{pipe.train.task.answer_words}: letters-format heads only transfer between tasks "
                          "with the same answer words (use --format options)")
    return encoded


@torch.no_grad()
def split_features(pipe: Pipeline, task: str | None = None, split: str | None = None, data_dir=None,
                   limit: int | None = None, progress: bool = False) -> tuple[Features, torch.Tensor, EncodedTask]:
    """Features (eval mode, the run's adapters), labels and the encoded questions of one split.

    ``split="train"`` of the training task gives the training questions (``train_limit`` applies,
    then ``limit``); other splits are encoded by :func:`encode_eval`. Defaults: the training task
    and its evaluation split.
    """
    task = task or pipe.config.task
    split = split or default_split(task)
    if (task, split) == (pipe.config.task, "train"):
        encoded = pipe.train if limit is None else replace(
            pipe.train, items=pipe.train.items[:limit], task=replace(pipe.train.task, examples=pipe.train.task.examples[:limit]))
    else:
        encoded = encode_eval(pipe, task, split, data_dir, limit)
    pipe.model.eval()
    loader = make_loader(encoded, pipe.tokenizer, batch_size=pipe.config.eval_batch_size)
    phi, mask, labels = extract_features(pipe.method.extractor, loader, progress)
    return Features(phi, mask), labels, encoded


@torch.no_grad()
def predict(pipe: Pipeline, encoded: EncodedTask, num_samples: int, progress: bool = False) -> dict:
    """Predictive, point and zero-shot probabilities over an encoded split, with its labels."""
    loader = make_loader(encoded, pipe.tokenizer, batch_size=pipe.config.eval_batch_size)
    out = {"predictive": [], "point": [], "zero_shot": [], "labels": []}
    for batch in tqdm(loader, desc=f"eval {encoded.task.name}", disable=not progress, leave=False):
        pipe.model.eval()
        features = pipe.method.features(batch)
        out["predictive"].append(pipe.method.predict_proba(batch, num_samples, features))
        out["point"].append(pipe.method.head.point_proba(features))
        out["zero_shot"].append(head_logits(pipe.zero_shot, features.phi, features.mask).softmax(-1))
        out["labels"].append(batch.labels)
    return {k: torch.cat(v) for k, v in out.items()}


def metrics_of(predictions: dict) -> dict:
    labels = predictions["labels"]
    result = classification_metrics(predictions["predictive"], labels)
    result["point"] = classification_metrics(predictions["point"], labels)
    result["zero_shot"] = classification_metrics(predictions["zero_shot"], labels)
    return result


def run_fit(config: FitConfig, out, overwrite: bool = False, resume: bool = False, progress: bool = True,
            log=print) -> dict:
    """Train ``config`` into RUN_DIR ``out`` (resuming from its latest checkpoint if asked)."""
    run_dir = prepare_run_dir(out, overwrite=overwrite, resume=resume)
    _check_resume_config(run_dir, config, resume)
    config.save(run_dir / "config.json")
    started = time.time()
    pipe = build_pipeline(config)
    warm_prefix_cache(pipe.method, pipe.train, pipe.tokenizer, config.eval_batch_size, progress)
    step, trace = 0, []
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        tensors, state, _ = load_checkpoint(checkpoint)
        step, trace = restore_training_state(pipe.method, tensors, state)
        log(f"resuming from {checkpoint} at step {step}")
    loader = epoch_loader(pipe.train, pipe.tokenizer, config.batch_size, config.seed)
    bar = tqdm(total=config.steps, initial=step, desc=config.method, disable=not progress)
    key = "elbo" if is_variational(config.method) else "nll"

    def callback(done: int, logs: dict) -> bool:
        trace.append(logs.get(key, float("nan")))
        bar.update(1)
        bar.set_postfix({key: f"{trace[-1]:.4f}"})
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            save_checkpoint(run_dir, *training_state(pipe.method, done, trace), step=done)
        return False

    step = fit(pipe.method, loader, config.steps, step, callback)
    bar.close()
    save_checkpoint(run_dir, *training_state(pipe.method, step, trace), step=step)
    seconds_training = time.time() - started
    if config.method in ("polar-vbll-la", "lora-laplace"):
        plain = make_loader(pipe.train, pipe.tokenizer, batch_size=config.eval_batch_size)
        pipe.method.fit_laplace(plain)
    metrics = {"method": config.method, "task": config.task, "format": config.format,
               "train": {"steps": step, "examples": len(pipe.train), "seconds": round(seconds_training, 1),
                         "truncated": pipe.train.num_truncated},
               f"{key}_trace": trace, "adapters": adapter_diagnostics(pipe.model), "evaluations": {},
               **pipe.method.extras}
    evaluate_into(pipe, run_dir, metrics, eval_targets(config), progress=progress)
    save_artifacts(pipe, run_dir)
    plot_elbo_trace(trace, run_dir / "elbo.png", ylabel="ELBO per example" if key == "elbo" else "NLL")
    atomic_write_json(run_dir / "metrics.json", metrics)
    log(summary_table(metrics))
    return metrics


def evaluate_into(pipe: Pipeline, run_dir: Path, metrics: dict, targets, data_dir=None, limit=None,
                  progress: bool = False) -> None:
    for task, split in targets:
        encoded = encode_eval(pipe, task, split, data_dir, limit)
        predictions = predict(pipe, encoded, pipe.config.predictive_samples, progress)
        metrics["evaluations"][f"{task}/{split}"] = {**metrics_of(predictions), "truncated": encoded.num_truncated}
        name = task if split == default_split(task) else f"{task}_{split}"
        reliability_diagram(predictions["predictive"], predictions["labels"], run_dir / f"reliability_{name}.png",
                            title=f"{pipe.config.method} on {task}/{split}")


def save_artifacts(pipe: Pipeline, run_dir: Path) -> None:
    from safetensors.torch import save_file

    save_adapters(pipe.model, run_dir / "adapters.safetensors")
    head = {k: v.contiguous() for k, v in pipe.method.state_tensors().items() if not k.startswith("adapter.")}
    save_file(head, run_dir / "head.safetensors", metadata={"method": pipe.config.method})


def load_run(run_dir, data_dir=None) -> Pipeline:
    """Rebuild a finished run: its config, adapters and head (and Laplace / temperature)."""
    from safetensors.torch import load_file

    from .adapters import load_adapters

    run_dir = Path(run_dir)
    config = FitConfig.load(run_dir / "config.json")
    pipe = build_pipeline(config, data_dir)
    load_adapters(pipe.model, run_dir / "adapters.safetensors")
    pipe.method.load_head_tensors(load_file(run_dir / "head.safetensors"))
    pipe.model.eval()
    return pipe


def evaluate_run(run_dir, task: str, split: str | None = None, data_dir=None, limit=None, log=print) -> dict:
    """Evaluate a finished run on any task/split and add the result to its metrics.json."""
    import json

    run_dir = Path(run_dir)
    pipe = load_run(run_dir, data_dir)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {"evaluations": {}}
    split = split or default_split(task)
    evaluate_into(pipe, run_dir, metrics, [(task, split)], data_dir, limit)
    atomic_write_json(metrics_path, metrics)
    log(summary_table(metrics))
    return metrics["evaluations"][f"{task}/{split}"]


def summary_table(metrics: dict) -> str:
    """A small text table: ACC / ECE / NLL of the zero-shot LM, the point prediction and the method."""
    lines = [f"{'task/split':34s} {'model':12s} {'ACC':>6s} {'ECE%':>6s} {'NLL':>6s} {'Brier':>6s}"]
    for name, result in metrics.get("evaluations", {}).items():
        rows = [("zero-shot", result["zero_shot"]), ("point", result["point"]), (metrics.get("method", "method"), result)]
        for label, r in rows:
            lines.append(f"{name:34s} {label:12s} {r['acc']:6.3f} {r['ece']:6.2f} {r['nll']:6.3f} {r['brier']:6.3f}")
    return "\n".join(lines)


def _check_resume_config(run_dir: Path, config: FitConfig, resume: bool) -> None:
    path = run_dir / "config.json"
    if not resume or not path.exists():
        return
    saved = FitConfig.load(path).to_dict()
    changed = {k for k, v in config.to_dict().items() if saved.get(k) != v and k not in ("steps", "threads")}
    if changed:
        raise ConfigError(f"--resume with a different configuration ({sorted(changed)}) than {path}; "
                          "resume with the same options (only --steps may grow)")
