"""Run a configuration end to end: build, train (resumable), evaluate, and write RUN_DIR.

RUN_DIR holds ``config.json`` (everything needed to rerun), ``metrics.json`` (per evaluated
task/split: acc, ece, ace, mce, cw_ece, nll, brier, n for the method, its point prediction and the
zero-shot LM; the method's selective prediction and mean uncertainty scores; for splits other than
the training task's, OOD detection AUROC/AUPR per score against it; the adapters' stable rank and
orthogonality error; the ELBO trace), ``reliability_<task>.png``, ``selective_<task>.png``,
``elbo.png``, ``adapters.safetensors``, ``head.safetensors``, ``layout.json`` and
``zero_shot.safetensors`` (what prediction needs without the training data; the four's sha256 in
``checksums.json``),
``checkpoints/`` and the lock file ``.bayes-polar-lock``. Deep ensembles keep one such set per member
under ``members/<m>/``.
"""
from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .training import distributed as ddp
from .adapters import adapter_diagnostics, load_adapters, save_adapters
from .data.backbone import load_backbone
from .data.device import move_backbone, resolve_device, resolve_dtype
from .training.checkpoint import (atomic_write_bytes, atomic_write_json, latest_checkpoint, load_checkpoint,
                                  prepare_run_dir)
from .training.manifest import listed, verify, write_manifest
from .config import MAX_ENSEMBLE_SIZE, MEMBER_SEED_BASE, FitConfig, read_json, saved_run
from .errors import (ArtifactError, BayesPolarWarning, CheckpointError, ConfigError, DataFormatError,
                     MissingFileError, NumericalError)
from .evaluation.metrics import classification_metrics, plot_elbo_trace, reliability_diagram
from .evaluation.ood import ood_detection
from .evaluation.selective import plot_selective, selective_curve, selective_metrics
from .evaluation.uncertainty import uncertainty_scores
from .training.faults import TrainingGuard
from .training.lock import RunLock, open_run_dir
from .training.resume import check_resume, has_run, steps_notice
from .trusted import loading_config
from .data.features import FeatureExtractor, Features, answer_head_rows, extract_features
from .data.formats import EncodedTask, encode_task, make_loader
from .training.trainable_heads import zero_shot_weights
from .training.head_start import fit_head_start
from .data.normalization import FeatureScaling
from .training.methods import (Ensemble, Method, attach_adapters, build_method, first_adapted_block, is_blob,
                               is_variational)
from .data.prefix_cache import CachedTrunk, model_fingerprint
from .bll.registry import load_prior
from .data.tasks import LETTERS, Task, default_split, derived_split, letters_transfer, load_task, split_heldout
from .data.user_tasks import is_task_path, user_task_spec
from .run_layout import FILES as LAYOUT_FILES, ZERO_SHOT_FILE, RunLayout
from .training.loop import epoch_loader, fit, restore_training_state, training_state



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


def eval_targets(eval_tasks: str | None, task: str) -> list[tuple[str, str]]:
    """``task[:split]`` entries of ``eval_tasks``; default: the training ``task``'s validation split
    (none when the task is a single file of the user's: its questions are the training questions)."""
    user = user_task_spec(task)
    if not eval_tasks and user is not None and user.single_file:
        return []
    targets = []
    for item in (eval_tasks or task).split(","):
        name, _, split = item.strip().partition(":")
        if name:
            targets.append((name, split or default_split(name)))
    return targets


def build_pipeline(config: FitConfig, data_dir=None, trunk_store: dict | None = None, backbone=None,
                   layout: tuple[RunLayout, torch.Tensor] | None = None, saved: dict | None = None,
                   seed: int | None = None) -> Pipeline:
    """Backbone + adapters + features + head + steps for ``config``, seeded by ``seed`` (default ``config.seed``).

    ``trunk_store``: a prefix-cache store shared with other pipelines on the same backbone (ensemble members).
    ``backbone``: a frozen ``(model, tokenizer)`` to use instead of loading ``config.model``, on
    any device and dtype (the adapters follow the model's device; the head stays on the CPU).
    ``layout``: a saved run's layout and zero-shot head (:mod:`bayes_polar.run_layout`): no training
    data is read, ``pipe.train`` is empty.
    ``saved``: the head tensors of a finished run (:func:`load_run`): its feature scaling is used and
    no start is fitted (the head is loaded next); otherwise :func:`fit_head_start` fits both.
    """
    seed = config.seed if seed is None else seed
    torch.set_num_threads(config.threads)
    torch.manual_seed(seed)
    if backbone is None:
        dtype = resolve_dtype(config.dtype)
        model, tokenizer = load_backbone(config.model, dtype=dtype, trust_remote_code=config.trust_remote_code)
        backbone = move_backbone(model, resolve_device(config.device), dtype), tokenizer
    model, tokenizer = backbone
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.disable_input_require_grads()  # non-reentrant: no grad through the frozen blocks below the adapters
    heldout = None
    if layout is not None:
        layout[0].check_backbone(model, tokenizer)
        train, dataset_size = layout[0].empty_train(), layout[0].train_examples
    else:
        train_task = load_task(config.task, config.train_split, data_dir or config.data_dir, limit=config.train_limit)
        if config.method == "temperature-scaling":
            train_task, heldout_task = split_heldout(train_task)
            heldout = encode_task(heldout_task, tokenizer, config.format, config.max_length)
        train = encode_task(train_task, tokenizer, config.format, config.max_length)
        dataset_size = len(train)
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
    zero_shot = zero_shot_weights(config.format, extractor.feature_dim, rows, config.loglik_features)
    start = None
    if saved is None:
        _warm_trunk(config, model, trunk, tokenizer, train)  # the head start reads the training features
        start = fit_head_start(extractor, train, tokenizer, zero_shot, config.feature_standardization,
                               config.eval_batch_size)
        zero_shot, init = start.zero_shot, start.init
    else:
        extractor.scaling = FeatureScaling.from_tensors(saved)
        if layout is not None:  # the zero-shot head as trained (already on the scaled features)
            if layout[1].shape != zero_shot.shape:
                raise ConfigError(f"{ZERO_SHOT_FILE} holds a {tuple(layout[1].shape)} head, this backbone and "
                                  f"format give {tuple(zero_shot.shape)}")
            zero_shot = layout[1]
        elif extractor.scaling is not None:
            zero_shot = extractor.scaling.weights(zero_shot)
        init = zero_shot
    prior = load_prior(config.prior, **config.prior_kwargs)
    prior.attach({"zero_shot_weights": zero_shot})
    torch.manual_seed(seed + 1)
    method = build_method(config, model, extractor, dataset_size=dataset_size, num_rows=init.shape[0],
                          init=init, prior=prior, num_classes=train.num_classes)
    if start is not None:
        method.extras["head_start"] = start.report()
    if is_variational(config.method):
        num_classes = train.num_classes
        dummy = Features(torch.zeros(1, num_classes if config.format == "options" else 1, extractor.feature_dim),
                         torch.ones(1, num_classes, dtype=torch.bool))
        method.head.setup(dummy, torch.zeros(1, dtype=torch.long))
    return Pipeline(config, model, tokenizer, train, method, zero_shot, heldout, seed)


def file_label(task: str) -> str:
    """A task name usable in a file name (a user's file: its stem)."""
    name = Path(task).stem if is_task_path(task) else task
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def encode_eval(pipe: Pipeline, task: str, split: str, data_dir=None, limit=None) -> EncodedTask:
    config = pipe.config
    loaded = load_task(task, split, data_dir or config.data_dir, limit=limit or config.eval_limit)
    unlabelled = sum(e.label is None for e in loaded.examples)
    if unlabelled:
        raise DataFormatError(f"{loaded.source}: {unlabelled} of {len(loaded)} questions have no answer, so they "
                              "cannot be scored; use bayes-polar predict (Predictor) for questions without answers")
    return encode_for(pipe, loaded)


def encode_for(pipe: Pipeline, task: Task) -> EncodedTask:
    """Encode ``task`` for the run's head. Letters format: questions answered by letters (A, B, ...) take the
    run's letters when they have no more choices than the head names; other answer words must match."""
    config, words = pipe.config, tuple(pipe.train.task.answer_words)
    lettered = set(words) <= set(LETTERS) and set(task.answer_words) <= set(LETTERS)
    if config.format == "letters" and lettered and task.examples:
        most = max(len(e.choices) for e in task.examples)
        if not letters_transfer(words, task.answer_words, most):
            raise ConfigError(f"{task.source}: a question has {most} choices, this letters-format head names "
                              f"{len(words)} ({', '.join(words)}): letters heads score questions with at most that "
                              "many choices (use --format options)")
        task = replace(task, answer_words=words, num_classes=len(words))
    encoded = encode_task(task, pipe.tokenizer, config.format, config.max_length)
    if config.format == "letters" and encoded.answer_ids != pipe.train.answer_ids:
        raise ConfigError(f"{task.name} answers with {encoded.task.answer_words}, the head was trained on "
                          f"{pipe.train.task.answer_words}: letters-format heads only transfer between tasks "
                          "with the same answer words (use --format options)")
    return encoded


# ------------------------------------------------------------------------------------ prefix cache on disk
def _cache_file(config: FitConfig, model, trunk, encoded: EncodedTask) -> Path | None:
    """Where ``--cache-dir`` keeps the prefix cache of ``encoded`` (None: no cache dir or no prefix cache)."""
    if not config.cache_dir or not isinstance(trunk, CachedTrunk):
        return None
    key = model_fingerprint(model, trunk.start_layer, trunk.dtype)
    name = f"{file_label(encoded.task.name)}-{encoded.task.split}-{encoded.format}-{encoded.max_length}-{len(encoded)}"
    root = Path(config.cache_dir).expanduser().resolve()
    path = (root / key / f"{name}.safetensors").resolve()
    if path.parent.parent != root:
        raise ConfigError(f"prefix-cache file name {name!r} leaves the cache folder {root}")
    return path


def _base_split_cache_files(path: Path, encoded: EncodedTask) -> list[Path]:
    """The cache files of the splits that ``encoded``'s derived split is cut from (``train-fit-heldout``:
    ``train-fit`` and ``train``): its questions' states are there already (the cache is keyed by token ids)."""
    found, split = [], encoded.task.split
    while derived_split(split)[1] is not None:
        split = derived_split(split)[0]
        stem = f"{file_label(encoded.task.name)}-{split}-{encoded.format}-{encoded.max_length}-"
        found += sorted(p for p in path.parent.glob(f"{stem}*.safetensors")
                        if p.name[len(stem):-len(".safetensors")].isdigit())
    return found


def _cache_manifest(path: Path) -> str:
    return path.name.removesuffix(".safetensors") + ".checksums.json"


def warm_cache(pipe: Pipeline, encoded: EncodedTask, progress: bool = False) -> None:
    """Fill the prefix cache of ``pipe``'s method for ``encoded`` (see :func:`_warm_trunk`)."""
    method = pipe.method.method if isinstance(pipe.method, Ensemble) else pipe.method
    _warm_trunk(pipe.config, pipe.model, method.extractor.trunk, pipe.tokenizer, encoded, progress)


def _warm_trunk(config: FitConfig, model, trunk, tokenizer, encoded: EncodedTask, progress: bool = False) -> None:
    """Fill ``trunk``'s prefix cache for ``encoded`` (from ``--cache-dir`` when a verified file exists there).

    The cache is optional: a file that fails its sha256 manifest (or holds NaN/Inf) is recomputed with
    a warning, and a write that fails (a full disk) is a warning too.
    """
    if not hasattr(trunk, "warm_task"):
        return
    path = _cache_file(config, model, trunk, encoded)
    saved = [] if path is None else ([path] if path.exists() else []) + _base_split_cache_files(path, encoded)
    for found in saved:
        try:
            trunk.load(verify(found.parent, found.name, _cache_manifest(found)))
        except (ArtifactError, NumericalError) as exc:
            warnings.warn(f"prefix cache {found} is unusable, recomputing it: {exc}", BayesPolarWarning, stacklevel=2)
    visited = set()
    added = trunk.warm_task(encoded, tokenizer, config.eval_batch_size, progress, visited)
    if path is not None and added and ddp.is_main():
        try:
            trunk.save(path, visited)  # this split's sequences only, not those of splits loaded or filled before
            write_manifest(path.parent, [path.name], _cache_manifest(path))
        except OSError as exc:
            warnings.warn(f"could not write the prefix cache {path} ({exc}); going on without it", BayesPolarWarning,
                          stacklevel=2)


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
    key = "elbo" if is_variational(config.method) else "neg_elbo" if is_blob(config.method) else "nll"

    def callback(done: int, logs: dict) -> bool:
        logs = ddp.mean_logs(logs)
        trace.append(logs.get(key, float("nan")))
        bar.update(1)
        bar.set_postfix({key: f"{trace[-1]:.4f}"})
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            ddp.save_checkpoint(run_dir, *_guarded_state(guard, done, trace, config), step=done)
        return False

    step = fit(guard, loader, config.steps, step, callback)
    bar.close()
    ddp.save_checkpoint(run_dir, *_guarded_state(guard, step, trace, config), step=step)
    if ddp.is_main():  # multi-process: only rank 0 evaluates and writes artifacts
        _posthoc(pipe)
    return {"steps": step, "examples": len(pipe.train), "seconds": round(time.time() - started, 1),
            "truncated": pipe.train.num_truncated, "dropped": pipe.train.task.dropped, "faults": guard.report(),
            "trace_name": f"{key}_trace", "trace": trace}


def _guarded_state(guard: TrainingGuard, step: int, trace: list[float], config: FitConfig) -> tuple[dict, dict]:
    """:func:`training_state` plus the guard's record of skipped steps and re-orthonormalisations, and the config."""
    tensors, state = training_state(guard.method, step, trace)
    return tensors, {**state, "faults": guard.state_dict(), "config": config.to_dict()}


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
        if ddp.on_main(_artifacts_ok, member_dir):
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


def check_buildable(config: FitConfig) -> None:
    """Build the prior and the guide builder once: a bad name, file or argument fails here, not mid-run."""
    from .bll.registry import load_guide

    load_prior(config.prior, **config.prior_kwargs)
    load_guide(config.guide, **config.guide_kwargs)


def run_fit(config: FitConfig, out, overwrite: bool = False, resume: bool = False, progress: bool = True,
            log=print, extend: bool = False) -> dict:
    """Train ``config`` into RUN_DIR ``out`` (resuming from its latest checkpoint if asked).

    ``extend``: with ``resume``, allow another ``steps`` than the run's (see :mod:`bayes_polar.training.resume`).

    Rank 0 holds RUN_DIR's lock (:mod:`bayes_polar.training.lock`) from before it looks at the
    directory until the last file is written. Under torchrun (:mod:`bayes_polar.training.distributed`)
    every process trains; rank 0 writes RUN_DIR and evaluates, and the other ranks return ``{}``.
    """
    check_buildable(config)  # before RUN_DIR exists
    with contextlib.ExitStack() as held:
        run_dir = ddp.on_main(lambda: held.enter_context(_prepare_run(out, config, overwrite, resume, extend, log)))
        return _fit_into(config, run_dir, resume, progress, log)


def _fit_into(config: FitConfig, run_dir: Path, resume: bool, progress: bool, log) -> dict:
    if config.method == "lora-ensemble":
        pipe, info = _fit_ensemble(config, run_dir, resume, progress, log)
    else:
        pipe = build_pipeline(config)
        info = train_pipeline(pipe, run_dir, resume, progress, log)
        ddp.on_main(save_artifacts, pipe, run_dir)
    if not ddp.is_main():
        return {}
    if config.method == "lora-ensemble":  # once for the run, besides each member's (save_artifacts)
        RunLayout.of(pipe).save(run_dir, pipe.zero_shot)
        write_manifest(run_dir, LAYOUT_FILES)
    trace_name, trace = info.pop("trace_name"), info.pop("trace")
    metrics = {"method": config.method, "task": config.task, "format": config.format,
               "backbone": backbone_placement(pipe.model), "train": info,
               trace_name: trace, "adapters": adapter_diagnostics(pipe.model), "evaluations": {},
               **pipe.method.extras}
    if config.python_objects:
        metrics["python_objects"] = {k: f"{v} (reloading needs the same object: load_run(run_dir, {k}=...))"
                                     for k, v in config.python_objects.items()}
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

    The training split of the training task (``config.train_split``) gives the training questions
    (``train_limit`` applies, then ``limit``); other splits are encoded by :func:`encode_eval`.
    Defaults: the training task and its evaluation split.
    """
    task = task or pipe.config.task
    split = split or default_split(task)
    training = (task, split) == (pipe.config.task, pipe.config.train_split)
    if training and not len(pipe.train):  # a loaded run: read them again
        limit = min(x for x in (limit, pipe.config.train_limit, 10 ** 12) if x is not None)
        encoded = encode_eval(pipe, task, split, data_dir, limit)
    elif training:
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
    """Predictive, point and zero-shot probabilities (N, C) over an encoded split, its labels (N,),
    and ``scores``: the per-question uncertainty scores of the method
    (:func:`~bayes_polar.evaluation.uncertainty.uncertainty_scores`, each (N,)).

    ``seed``: seeds torch's generator first (last-layer samples, dropout passes), so a reloaded
    run predicts exactly what it saved (:func:`evaluate_into` uses the run's ``config.seed``).
    """
    if seed is not None:
        torch.manual_seed(seed)
    loader = make_loader(encoded, pipe.tokenizer, batch_size=pipe.config.eval_batch_size)
    out = {"predictive": [], "point": [], "zero_shot": [], "labels": []}
    scores = {}
    for batch in tqdm(loader, desc=f"eval {encoded.task.name}", disable=not progress, leave=False):
        drawn = pipe.method.predict_samples(batch, num_samples)
        out["predictive"].append(drawn["samples"].mean(0))
        out["point"].append(drawn["point"])
        out["zero_shot"].append(pipe.method.zero_shot_proba(batch, pipe.zero_shot))
        out["labels"].append(batch.labels)
        for name, value in uncertainty_scores(drawn["samples"], drawn["mask"], drawn["logit_var"], drawn["feature_norm2"]).items():
            scores.setdefault(name, []).append(value)
    result = {k: torch.cat(v) for k, v in out.items()}
    result["scores"] = {k: torch.cat(v) for k, v in scores.items()}
    return result


def metrics_of(predictions: dict) -> dict:
    """Calibration metrics of the method, its point prediction and the zero-shot LM; the method's
    selective prediction (ranked by max probability) and mean uncertainty scores."""
    labels = predictions["labels"]
    result = classification_metrics(predictions["predictive"], labels)
    result["point"] = classification_metrics(predictions["point"], labels)
    result["zero_shot"] = classification_metrics(predictions["zero_shot"], labels)
    result["selective"] = selective_metrics(predictions["predictive"], labels)
    if predictions.get("scores"):
        result["uncertainty"] = {name: float(value.mean()) for name, value in predictions["scores"].items()}
    return result


def ood_into(run_dir: Path, metrics: dict, id_key: str) -> None:
    """OOD detection of every evaluated split against the in-distribution split ``id_key``
    (:func:`~bayes_polar.evaluation.ood.ood_detection` on the scores in ``predictions.safetensors``):
    ``evaluations[<split>]["ood"] = {"against": id_key, "auroc": {score: ..}, "aupr": {score: ..}}``."""
    from safetensors.torch import load_file

    path = run_dir / "predictions.safetensors"
    if id_key not in metrics["evaluations"] or not path.exists():
        return
    saved = load_file(path)

    def scores(key):
        prefix = f"{key}/scores/"
        return {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}

    reference = scores(id_key)
    for key, result in metrics["evaluations"].items():
        other = scores(key)
        if key == id_key or not reference or not other:
            continue
        detection = ood_detection(reference, other)
        result["ood"] = {"against": id_key, **{m: {name: d[m] for name, d in detection.items()} for m in ("auroc", "aupr")}}


def evaluate_into(pipe: Pipeline, run_dir: Path, metrics: dict, targets, data_dir=None, limit=None,
                  progress: bool = False) -> None:
    for task, split in targets:
        encoded = encode_eval(pipe, task, split, data_dir, limit)
        warm_cache(pipe, encoded, progress)
        predictions = predict(pipe, encoded, pipe.config.predictive_samples, progress, seed=pipe.config.seed)
        metrics["evaluations"][f"{task}/{split}"] = {**metrics_of(predictions), "truncated": encoded.num_truncated,
                                                     "dropped": encoded.task.dropped}
        save_predictions(run_dir / "predictions.safetensors", f"{task}/{split}", predictions)
        name = file_label(task) if split == default_split(task) else f"{file_label(task)}_{split}"
        reliability_diagram(predictions["predictive"], predictions["labels"], run_dir / f"reliability_{name}.png",
                            title=f"{pipe.config.method} on {task}/{split}")
        curves = {pipe.config.method: selective_curve(predictions["predictive"], predictions["labels"]),
                  "zero-shot": selective_curve(predictions["zero_shot"], predictions["labels"])}
        plot_selective(curves, run_dir / f"selective_{name}.png", title=f"{pipe.config.method} on {task}/{split}")
    ood_into(run_dir, metrics, f"{pipe.config.task}/{default_split(pipe.config.task)}")


def save_predictions(path: Path, key: str, predictions: dict) -> None:
    """Add ``<key>/probs``, ``<key>/point``, ``<key>/labels`` and ``<key>/scores/<name>`` (uncertainty
    scores per question) to a safetensors file of predictions."""
    from safetensors.torch import save

    saved = _read_predictions(path)
    saved.update({f"{key}/probs": predictions["predictive"], f"{key}/point": predictions["point"],
                  f"{key}/labels": predictions["labels"]})
    saved.update({f"{key}/scores/{name}": value for name, value in predictions.get("scores", {}).items()})
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in saved.items()}))


def _read_predictions(path: Path) -> dict:
    """The predictions saved so far ({} if none); an unreadable file is an ArtifactError naming it."""
    from safetensors.torch import load_file

    if not path.exists():
        return {}
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a bad header
        raise ArtifactError(f"{path} does not parse as safetensors ({exc}); move it aside and run again") from None


ARTIFACTS = ("adapters.safetensors", "head.safetensors")


def save_artifacts(pipe: Pipeline, run_dir: Path) -> None:
    """The final adapters and head, each written atomically, then their sha256 manifest."""
    from safetensors.torch import save

    save_adapters(pipe.model, run_dir / ARTIFACTS[0])
    head = {k: v.contiguous() for k, v in pipe.method.state_tensors().items() if not k.startswith("adapter.")}
    atomic_write_bytes(run_dir / ARTIFACTS[1], save(head, metadata={"method": pipe.config.method}))
    RunLayout.of(pipe).save(run_dir, pipe.zero_shot)
    write_manifest(run_dir, ARTIFACTS + LAYOUT_FILES)


def _load_artifacts(pipe: Pipeline, run_dir: Path) -> None:
    load_adapters(pipe.model, _verified(run_dir, ARTIFACTS[0]))
    pipe.method.load_head_tensors(_saved_head(run_dir))


def _saved_layout(run_dir: Path):
    """:meth:`RunLayout.load`, its files verified against the manifest where it lists them (older runs'
    manifests do not)."""
    if listed(run_dir, LAYOUT_FILES[0]):
        for name in LAYOUT_FILES:
            _verified(run_dir, name)
    return RunLayout.load(run_dir)


def _saved_head(run_dir: Path) -> dict:
    """The run's head tensors (feature scaling included), verified against its manifest."""
    from safetensors.torch import load_file

    return load_file(_verified(run_dir, ARTIFACTS[1]))


def _verified(folder: Path, name: str) -> Path:
    """``folder/name`` checked against its manifest; the error says how to get a good one back."""
    try:
        return verify(folder, name)
    except ArtifactError as exc:
        try:
            good = latest_checkpoint(folder)
        except CheckpointError:
            good = None
        fix = (f"its checkpoint {good} is valid: run the same bayes-polar fit again with --resume to rewrite it"
               if good is not None else "no valid checkpoint is left: fit the run again")
        raise ArtifactError(f"{exc}; {fix}") from None


def _artifacts_ok(folder: Path) -> bool:
    try:
        for name in ARTIFACTS:
            verify(folder, name)
    except ArtifactError as exc:
        if (folder / ARTIFACTS[1]).exists():
            warnings.warn(f"{exc}; training it again from its checkpoint", BayesPolarWarning, stacklevel=2)
        return False
    return True


def backbone_placement(model) -> dict:
    """``{"device", "dtype"}`` of the backbone's weights, as recorded in metrics.json."""
    weight = model.get_input_embeddings().weight
    return {"device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch.")}


def load_run(run_dir, data_dir=None, **options) -> Pipeline:
    """Rebuild a finished run: its config, adapters and head (Laplace, temperature, ensemble members).

    Runs that saved their layout (``layout.json``) need no training data; older runs re-read it.
    ``options`` of :func:`~bayes_polar.trusted.loading_config`: ``trust_remote_code``,
    ``allow_code_from_run``, ``prior``/``guide`` (a re-passed ``.py`` file, or the Python object the run
    was configured with), ``cache_dir``, and ``device``/``dtype`` overrides: the run directory decides
    no code and no write path.
    """
    run_dir = Path(run_dir)
    layout = _saved_layout(run_dir)
    with saved_run() if layout is not None else contextlib.nullcontext():  # its tasks need not exist now
        config = loading_config(run_dir, **options)
        return _load_run(run_dir, config, layout, data_dir)


def _load_run(run_dir: Path, config: FitConfig, layout, data_dir) -> Pipeline:
    if config.method == "lora-ensemble":
        members, store, pipe = [], None, None
        for m in range(config.ensemble_size):
            member_dir = run_dir / "members" / str(m)
            member_config, seed = _member_config(config, m)
            pipe = build_pipeline(member_config, data_dir, store, layout=layout or _saved_layout(member_dir),
                                  saved=_saved_head(member_dir), seed=seed)
            store = pipe.method.extractor.trunk.store if pipe.method.extractor.trunk is not None else None
            _load_artifacts(pipe, member_dir)
            members.append(pipe.method.state_tensors())
        pipe.method, pipe.config = Ensemble(pipe.method, members), config
        return pipe
    pipe = build_pipeline(config, data_dir, layout=layout, saved=_saved_head(run_dir))
    _load_artifacts(pipe, run_dir)
    pipe.model.eval()
    return pipe


def evaluate_run(run_dir, task: str, split: str | None = None, data_dir=None, limit=None, log=print,
                 **options) -> dict:
    """Evaluate a finished run on any task/split and add the result to its metrics.json.

    Holds RUN_DIR's lock (no fit may write there meanwhile); ``options`` as in :func:`load_run`.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise MissingFileError(f"{run_dir} is not a finished run (no config.json)")
    lock = RunLock(run_dir)
    try:
        metrics_path = run_dir / "metrics.json"
        metrics = _read_metrics(metrics_path) if metrics_path.exists() else {"evaluations": {}}
        _read_predictions(run_dir / "predictions.safetensors")  # a bad one fails now, not after evaluating
        pipe = load_run(run_dir, data_dir, **options)
        split = split or default_split(task)
        evaluate_into(pipe, run_dir, metrics, [(task, split)], data_dir, limit)
        atomic_write_json(metrics_path, metrics)
    finally:
        lock.release()
    log(summary_table(metrics))
    return metrics["evaluations"][f"{task}/{split}"]


def _read_metrics(path: Path) -> dict:
    """metrics.json, checked before anything is evaluated (a malformed one is an error naming it)."""
    metrics = read_json(path, "the metrics file")
    if not isinstance(metrics.get("evaluations"), dict):
        raise ConfigError(f"{path} is malformed: it has no 'evaluations' object; move it aside to start a new one")
    return metrics


def summary_table(metrics: dict) -> str:
    """A small text table: ACC / ECE / NLL of the zero-shot LM, the point prediction and the method."""
    lines = [f"{'task/split':34s} {'model':14s} {'ACC':>6s} {'ECE%':>6s} {'NLL':>6s} {'Brier':>6s}"]
    for name, result in metrics.get("evaluations", {}).items():
        rows = [("zero-shot", result["zero_shot"]), ("point", result["point"]), (metrics.get("method", "method"), result)]
        for label, r in rows:
            lines.append(f"{name:34s} {label:14s} {r['acc']:6.3f} {r['ece']:6.2f} {r['nll']:6.3f} {r['brier']:6.3f}")
    return "\n".join(lines)


@contextlib.contextmanager
def _prepare_run(out, config: FitConfig, overwrite: bool, resume: bool, extend: bool = False, log=print):
    """RUN_DIR, locked, checked for a resume and holding ``config.json``; unlocked on exit."""
    if resume and not overwrite and not has_run(out):  # both: prepare_run_dir says why not
        raise ConfigError(f"--resume: {out} holds no run to resume (no bayes-polar run there); check the "
                          "path, or start without --resume")
    with open_run_dir(out, overwrite=overwrite, resume=resume) as run_dir:
        if resume:
            path = run_dir / "config.json"
            saved = read_json(path, "the configuration") if path.is_file() else None  # as written
            check_resume(config, saved, _checkpoint_folders(run_dir, config), extend, path)
            notice = steps_notice(config, saved)
            if notice:
                log(notice)
        config.save(run_dir / "config.json")
        yield run_dir


def _checkpoint_folders(run_dir: Path, config: FitConfig) -> list[tuple[Path, FitConfig]]:
    """``(folder, config of its checkpoints)``: RUN_DIR, or each ensemble member's folder."""
    if config.method != "lora-ensemble":
        return [(run_dir, config)]
    return [(run_dir / "members" / str(m), _member_config(config, m)[0]) for m in range(config.ensemble_size)
            if (run_dir / "members" / str(m)).is_dir()]
