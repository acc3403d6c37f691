"""Run a configuration end to end: build, train (resumable), evaluate, and write RUN_DIR.

RUN_DIR holds ``config.json`` (everything needed to rerun), ``metrics.json`` (per evaluated
task/split: acc, ece, nll, brier, n for the method, its point prediction and the zero-shot LM;
the adapters' stable rank and orthogonality error; the ELBO trace), ``reliability_<task>.png``,
``elbo.png``, ``adapters.safetensors``, ``head.safetensors`` and ``checkpoints/``. Deep
ensembles keep one such set per member under ``members/<m>/``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .training import distributed as ddp
from .adapters import adapter_diagnostics, load_adapters, save_adapters
from .data.backbone import load_backbone
from .training.checkpoint import atomic_write_json, latest_checkpoint, load_checkpoint, prepare_run_dir
from .config import MAX_ENSEMBLE_SIZE, MEMBER_SEED_BASE, FitConfig
from .errors import ConfigError
from .evaluation.metrics import classification_metrics, plot_elbo_trace, reliability_diagram
from .training.faults import TrainingGuard
from .data.features import FeatureExtractor, Features, answer_head_rows, extract_features
from .data.formats import EncodedTask, encode_task, make_loader
from .training.trainable_heads import zero_shot_weights
from .training.methods import Ensemble, Method, attach_adapters, build_method, first_adapted_block, is_variational
from .data.prefix_cache import CachedTrunk, model_fingerprint
from .bll.registry import load_prior
from .data.tasks import Task, load_task, task_spec
from .training.loop import epoch_loader, fit, restore_training_state, training_state, warm_prefix_cache

HELDOUT_FRACTION = 0.1  # temperature scaling fits T on this slice of the training split


@dataclass
class Pipeline:
    config: FitConfig
    model: torch.nn.Module
    tokenizer: object
    train: EncodedTask
    method: Method | Ensemble
    zero_shot: torch.Tensor  # (K, D) head weights of the zero-shot LM
    heldout: EncodedTask | None = None
    seed: int = 0  # what seeded initialisation and minibatch order: config.seed, or a member_seed


def default_split(task: str) -> str:
    files = task_spec(task).files
    return "validation" if "validation" in files else "test"


def eval_targets(eval_tasks: str | None, task: str) -> list[tuple[str, str]]:
    """``task[:split]`` entries of ``eval_tasks``; default: the training ``task``'s validation split."""
    targets = []
    for item in (eval_tasks or task).split(","):
        name, _, split = item.strip().partition(":")
        if name:
            targets.append((name, split or default_split(name)))
    return targets


def _split_heldout(task: Task) -> tuple[Task, Task]:
    cut = len(task) - max(1, int(len(task) * HELDOUT_FRACTION))
    keep = replace(task, examples=task.examples[:cut])
    return keep, replace(task, examples=task.examples[cut:], split=f"{task.split}-heldout")


def build_pipeline(config: FitConfig, data_dir=None, trunk_store: dict | None = None, backbone=None,
                   seed: int | None = None) -> Pipeline:
    """Backbone + adapters + features + head + steps for ``config``, seeded by ``seed`` (default ``config.seed``).

    ``trunk_store``: a prefix-cache store shared with other pipelines on the same backbone (ensemble members).
    ``backbone``: a frozen ``(model, tokenizer)`` to use instead of loading ``config.model``, on
    any device and dtype (the adapters follow the model's device; the head stays on the CPU).
    """
    seed = config.seed if seed is None else seed
    torch.set_num_threads(config.threads)
    torch.manual_seed(seed)
    if backbone is None:
        backbone = load_backbone(config.model, trust_remote_code=config.trust_remote_code)
    model, tokenizer = backbone
    train_task = load_task(config.task, "train", data_dir or config.data_dir, limit=config.train_limit)
    heldout = None
    if config.method == "temperature-scaling":
        train_task, heldout_task = _split_heldout(train_task)
        heldout = encode_task(heldout_task, tokenizer, config.format, config.max_length)
    train = encode_task(train_task, tokenizer, config.format, config.max_length)
    torch.manual_seed(seed)
    attach_adapters(model, config)
    start = first_adapted_block(model, config.layer_indices)
    trunk = None
    if config.prefix_cache and start >= 1:
        trunk = CachedTrunk(model, start, getattr(torch, config.cache_dtype))
        if trunk_store is not None:
            trunk.store = trunk_store
    extractor = FeatureExtractor(model, config.format, config.loglik_features, trunk)
    rows = answer_head_rows(model, train.answer_ids) if config.format == "letters" else None
    init = zero_shot_weights(config.format, extractor.feature_dim, rows, config.loglik_features)
    prior = load_prior(config.prior, **config.prior_kwargs)
    prior.attach({"zero_shot_weights": init})
    torch.manual_seed(seed + 1)
    method = build_method(config, model, extractor, dataset_size=len(train), num_rows=init.shape[0],
                          init=init, prior=prior)
    if is_variational(config.method):
        num_classes = train.num_classes
        dummy = Features(torch.zeros(1, num_classes if config.format == "options" else 1, extractor.feature_dim),
                         torch.ones(1, num_classes, dtype=torch.bool))
        method.head.setup(dummy, torch.zeros(1, dtype=torch.long))
    return Pipeline(config, model, tokenizer, train, method, init, heldout, seed)


def encode_eval(pipe: Pipeline, task: str, split: str, data_dir=None, limit=None) -> EncodedTask:
    config = pipe.config
    encoded = encode_task(load_task(task, split, data_dir or config.data_dir, limit=limit or config.eval_limit),
                          pipe.tokenizer, config.format, config.max_length)
    if config.format == "letters" and encoded.answer_ids != pipe.train.answer_ids:
        raise ConfigError(f"{task} answers with {encoded.task.answer_words}, the head was trained on "
                          f"{pipe.train.task.answer_words}: letters-format heads only transfer between tasks "
                          "with the same answer words (use --format options)")
    return encoded


# ------------------------------------------------------------------------------------ prefix cache on disk
def _cache_file(pipe: Pipeline, encoded: EncodedTask) -> Path | None:
    trunk = getattr(pipe.method.extractor if isinstance(pipe.method, Method) else pipe.method.method.extractor,
                    "trunk", None)
    if not pipe.config.cache_dir or not isinstance(trunk, CachedTrunk):
        return None
    key = model_fingerprint(pipe.model, trunk.start_layer, trunk.dtype)
    name = f"{encoded.task.name}-{encoded.task.split}-{encoded.format}-{encoded.max_length}-{len(encoded)}"
    return Path(pipe.config.cache_dir).expanduser() / key / f"{name}.safetensors"


def warm_cache(pipe: Pipeline, encoded: EncodedTask, progress: bool = False) -> None:
    """Fill the prefix cache for ``encoded`` (from ``--cache-dir`` when a file exists there)."""
    method = pipe.method.method if isinstance(pipe.method, Ensemble) else pipe.method
    path = _cache_file(pipe, encoded)
    if path is not None and path.exists():
        method.extractor.trunk.load(path)
    added = warm_prefix_cache(method, encoded, pipe.tokenizer, pipe.config.eval_batch_size, progress)
    if path is not None and added and ddp.is_main():
        method.extractor.trunk.save(path)


# ------------------------------------------------------------------------------------ training
def train_pipeline(pipe: Pipeline, run_dir: Path, resume: bool, progress: bool, log=print) -> dict:
    """Fit ``pipe.method`` with checkpoints in ``run_dir``; then its post-hoc step (Laplace, T)."""
    config, method = pipe.config, pipe.method
    started = time.time()
    warm_cache(pipe, pipe.train, progress)
    step, trace = 0, []
    guard = TrainingGuard.from_config(method, config, run_dir, log)
    checkpoint = ddp.on_main(latest_checkpoint, run_dir) if resume else None  # the same one on every rank
    if checkpoint is not None:
        tensors, state, _ = load_checkpoint(checkpoint)
        step, trace = restore_training_state(method, tensors, state)
        ddp.restore_rank_state(state)
        guard.load_state_dict(state.get("faults"))
        log(f"resuming from {checkpoint} at step {step}")
    ddp.replicate(method)  # multi-process: rank 0's parameters everywhere, gradients averaged over ranks
    loader = epoch_loader(pipe.train, pipe.tokenizer, config.batch_size, pipe.seed, *ddp.shard())
    bar = tqdm(total=config.steps, initial=step, desc=config.method, disable=not progress)
    key = "elbo" if is_variational(config.method) else "nll"

    def callback(done: int, logs: dict) -> bool:
        logs = ddp.mean_logs(logs)
        trace.append(logs.get(key, float("nan")))
        bar.update(1)
        bar.set_postfix({key: f"{trace[-1]:.4f}"})
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            ddp.save_checkpoint(run_dir, *_guarded_state(guard, done, trace), step=done)
        return False

    step = fit(guard, loader, config.steps, step, callback)
    bar.close()
    ddp.save_checkpoint(run_dir, *_guarded_state(guard, step, trace), step=step)
    if ddp.is_main():  # multi-process: only rank 0 evaluates and writes artifacts
        _posthoc(pipe)
    return {"steps": step, "examples": len(pipe.train), "seconds": round(time.time() - started, 1),
            "truncated": pipe.train.num_truncated, "dropped": pipe.train.task.dropped, "faults": guard.report(),
            "trace_name": f"{key}_trace", "trace": trace}


def _guarded_state(guard: TrainingGuard, step: int, trace: list[float]) -> tuple[dict, dict]:
    """:func:`training_state` plus the guard's record of skipped steps and re-orthonormalisations."""
    tensors, state = training_state(guard.method, step, trace)
    return tensors, {**state, "faults": guard.state_dict()}


def _posthoc(pipe: Pipeline) -> None:
    config, method = pipe.config, pipe.method
    if config.method in ("polar-vbll-la", "lora-laplace"):  # both: δ by the Laplace evidence, the prior's mean
        method.fit_laplace(make_loader(pipe.train, pipe.tokenizer, batch_size=config.eval_batch_size))
    elif config.method == "temperature-scaling":
        warm_cache(pipe, pipe.heldout)
        method.fit_temperature(make_loader(pipe.heldout, pipe.tokenizer, batch_size=config.eval_batch_size))


def member_seed(seed: int, m: int) -> int:
    """Seed of ensemble member ``m`` of a run with ``seed``: 2³¹ + seed · 2¹¹ + m.

    One-to-one in (seed, m) for seed < 2¹⁹ and m < 2¹¹ (FitConfig.validate), and at least 2³¹,
    so no two members of any runs share a seed and no member shares one with a plain run (seeds
    below 2¹⁹). Below 2³² on purpose: torch's CPU generator keeps only a seed's low 32 bits.
    """
    return MEMBER_SEED_BASE + seed * MAX_ENSEMBLE_SIZE + m


def _member_config(config: FitConfig, m: int) -> tuple[FitConfig, int]:
    """Ensemble member ``m``: a ``lora-mle`` run, and its seed :func:`member_seed` (seed, m)."""
    return replace(config, method="lora-mle"), member_seed(config.seed, m)


def _fit_ensemble(config: FitConfig, run_dir: Path, resume: bool, progress: bool, log) -> tuple[Pipeline, dict]:
    """Train M ``lora-mle`` members (seeds :func:`member_seed`) under ``members/<m>``; finished ones are kept."""
    members, store, info, pipe = [], None, [], None
    for m in range(config.ensemble_size):
        member_config, seed = _member_config(config, m)
        member_dir = ddp.on_main(prepare_run_dir, run_dir / "members" / str(m), resume=True)
        pipe = build_pipeline(member_config, trunk_store=store, seed=seed)
        if pipe.method.extractor.trunk is not None:
            store = pipe.method.extractor.trunk.store  # frozen blocks are shared by every member
        if ddp.on_main((member_dir / "head.safetensors").exists):
            _load_artifacts(pipe, member_dir)
        else:
            info.append(train_pipeline(pipe, member_dir, resume, progress, log))
            ddp.on_main(save_artifacts, pipe, member_dir)
        members.append(pipe.method.state_tensors())
    pipe.method = Ensemble(pipe.method, members)
    pipe.config = config
    trace = [x for item in info for x in item["trace"]]
    return pipe, {"steps": config.steps * config.ensemble_size, "examples": len(pipe.train),
                  "seconds": round(sum(i["seconds"] for i in info), 1), "truncated": pipe.train.num_truncated,
                  "dropped": pipe.train.task.dropped, "faults": [i["faults"] for i in info],
                  "trace_name": "nll_trace", "trace": trace}


def run_fit(config: FitConfig, out, overwrite: bool = False, resume: bool = False, progress: bool = True,
            log=print) -> dict:
    """Train ``config`` into RUN_DIR ``out`` (resuming from its latest checkpoint if asked).

    Under torchrun (:mod:`bayes_polar.training.distributed`) every process trains; rank 0 writes RUN_DIR and
    evaluates, and the other ranks return ``{}`` after training.
    """
    run_dir = ddp.on_main(_prepare_run, out, config, overwrite, resume)
    if config.method == "lora-ensemble":
        pipe, info = _fit_ensemble(config, run_dir, resume, progress, log)
    else:
        pipe = build_pipeline(config)
        info = train_pipeline(pipe, run_dir, resume, progress, log)
        ddp.on_main(save_artifacts, pipe, run_dir)
    if not ddp.is_main():
        return {}
    trace_name, trace = info.pop("trace_name"), info.pop("trace")
    metrics = {"method": config.method, "task": config.task, "format": config.format, "train": info,
               trace_name: trace, "adapters": adapter_diagnostics(pipe.model), "evaluations": {},
               **pipe.method.extras}
    evaluate_into(pipe, run_dir, metrics, eval_targets(config.eval_tasks, config.task), progress=progress)
    plot_elbo_trace(trace, run_dir / "elbo.png", ylabel="ELBO per example" if trace_name == "elbo_trace" else "NLL")
    atomic_write_json(run_dir / "metrics.json", metrics)
    log(summary_table(metrics))
    return metrics


# ------------------------------------------------------------------------------------ evaluation
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
def predict(pipe: Pipeline, encoded: EncodedTask, num_samples: int, progress: bool = False,
            seed: int | None = None) -> dict:
    """Predictive, point and zero-shot probabilities over an encoded split, with its labels.

    ``seed``: seeds torch's generator first (last-layer samples, dropout passes), so a reloaded
    run predicts exactly what it saved (:func:`evaluate_into` uses the run's ``config.seed``).
    """
    if seed is not None:
        torch.manual_seed(seed)
    loader = make_loader(encoded, pipe.tokenizer, batch_size=pipe.config.eval_batch_size)
    out = {"predictive": [], "point": [], "zero_shot": [], "labels": []}
    for batch in tqdm(loader, desc=f"eval {encoded.task.name}", disable=not progress, leave=False):
        predictive, point = pipe.method.predict(batch, num_samples)
        out["predictive"].append(predictive)
        out["point"].append(point)
        out["zero_shot"].append(pipe.method.zero_shot_proba(batch, pipe.zero_shot))
        out["labels"].append(batch.labels)
    return {k: torch.cat(v) for k, v in out.items()}


def metrics_of(predictions: dict) -> dict:
    labels = predictions["labels"]
    result = classification_metrics(predictions["predictive"], labels)
    result["point"] = classification_metrics(predictions["point"], labels)
    result["zero_shot"] = classification_metrics(predictions["zero_shot"], labels)
    return result


def evaluate_into(pipe: Pipeline, run_dir: Path, metrics: dict, targets, data_dir=None, limit=None,
                  progress: bool = False) -> None:
    for task, split in targets:
        encoded = encode_eval(pipe, task, split, data_dir, limit)
        warm_cache(pipe, encoded, progress)
        predictions = predict(pipe, encoded, pipe.config.predictive_samples, progress, seed=pipe.config.seed)
        metrics["evaluations"][f"{task}/{split}"] = {**metrics_of(predictions), "truncated": encoded.num_truncated,
                                                     "dropped": encoded.task.dropped}
        save_predictions(run_dir / "predictions.safetensors", f"{task}/{split}", predictions)
        name = task if split == default_split(task) else f"{task}_{split}"
        reliability_diagram(predictions["predictive"], predictions["labels"], run_dir / f"reliability_{name}.png",
                            title=f"{pipe.config.method} on {task}/{split}")


def save_predictions(path: Path, key: str, predictions: dict) -> None:
    """Add ``<key>/probs``, ``<key>/point`` and ``<key>/labels`` to a safetensors file of predictions."""
    from safetensors.torch import load_file, save_file

    saved = load_file(path) if path.exists() else {}
    saved.update({f"{key}/probs": predictions["predictive"], f"{key}/point": predictions["point"],
                  f"{key}/labels": predictions["labels"]})
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in saved.items()}, tmp)
    tmp.replace(path)


def save_artifacts(pipe: Pipeline, run_dir: Path) -> None:
    from safetensors.torch import save_file

    save_adapters(pipe.model, run_dir / "adapters.safetensors")
    head = {k: v.contiguous() for k, v in pipe.method.state_tensors().items() if not k.startswith("adapter.")}
    save_file(head, run_dir / "head.safetensors", metadata={"method": pipe.config.method})


def _load_artifacts(pipe: Pipeline, run_dir: Path) -> None:
    from safetensors.torch import load_file

    load_adapters(pipe.model, run_dir / "adapters.safetensors")
    pipe.method.load_head_tensors(load_file(run_dir / "head.safetensors"))


def load_run(run_dir, data_dir=None) -> Pipeline:
    """Rebuild a finished run: its config, adapters and head (Laplace, temperature, ensemble members)."""
    run_dir = Path(run_dir)
    config = FitConfig.load(run_dir / "config.json")
    if config.method == "lora-ensemble":
        members, store, pipe = [], None, None
        for m in range(config.ensemble_size):
            member_config, seed = _member_config(config, m)
            pipe = build_pipeline(member_config, data_dir, store, seed=seed)
            store = pipe.method.extractor.trunk.store if pipe.method.extractor.trunk is not None else None
            _load_artifacts(pipe, run_dir / "members" / str(m))
            members.append(pipe.method.state_tensors())
        pipe.method, pipe.config = Ensemble(pipe.method, members), config
        return pipe
    pipe = build_pipeline(config, data_dir)
    _load_artifacts(pipe, run_dir)
    pipe.model.eval()
    return pipe


def evaluate_run(run_dir, task: str, split: str | None = None, data_dir=None, limit=None, log=print) -> dict:
    """Evaluate a finished run on any task/split and add the result to its metrics.json."""
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
    lines = [f"{'task/split':34s} {'model':14s} {'ACC':>6s} {'ECE%':>6s} {'NLL':>6s} {'Brier':>6s}"]
    for name, result in metrics.get("evaluations", {}).items():
        rows = [("zero-shot", result["zero_shot"]), ("point", result["point"]), (metrics.get("method", "method"), result)]
        for label, r in rows:
            lines.append(f"{name:34s} {label:14s} {r['acc']:6.3f} {r['ece']:6.2f} {r['nll']:6.3f} {r['brier']:6.3f}")
    return "\n".join(lines)


def _prepare_run(out, config: FitConfig, overwrite: bool, resume: bool) -> Path:
    run_dir = prepare_run_dir(out, overwrite=overwrite, resume=resume)
    _check_resume_config(run_dir, config, resume)
    config.save(run_dir / "config.json")
    return run_dir


def _check_resume_config(run_dir: Path, config: FitConfig, resume: bool) -> None:
    path = run_dir / "config.json"
    if not resume or not path.exists():
        return
    saved = FitConfig.load(path).to_dict()
    free = ("steps", "threads", "on_nan", "max_skipped_batches")  # change nothing an uninterrupted run computes
    changed = {k for k, v in config.to_dict().items() if saved.get(k) != v and k not in free}
    if changed:
        raise ConfigError(f"--resume with a different configuration ({sorted(changed)}) than {path}; "
                          "resume with the same options (only --steps, --threads, --on-nan and "
                          "--max-skipped-batches may change)")
