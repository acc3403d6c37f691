"""Numerical faults on the tiny random Llama: caught at their step, never checkpointed, or skipped exactly."""
import copy
import json
import math

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from bayes_polar.adapters import orthogonality_error, polar_layers
from bayes_polar.training.checkpoint import latest_checkpoint, load_checkpoint
from bayes_polar.errors import NumericalError
from bayes_polar.training.faults import TrainingGuard
from bayes_polar.data.features import FeatureExtractor
from bayes_polar.run import build_pipeline, run_fit
from bayes_polar.training.steps import AdapterStep
from bayes_polar.training.loop import epoch_loader, warm_prefix_cache

from .test_fit import tiny_config

pytestmark = pytest.mark.integration
QUIET = dict(progress=False, log=lambda *_: None)


def _example_of_step(config, step: int) -> int:
    """Index of a training example that the minibatch of (1-based) ``step`` in epoch 0 holds."""
    sampler = DistributedSampler(range(config.train_limit), num_replicas=1, rank=0, shuffle=True, seed=config.seed)
    sampler.set_epoch(0)
    return list(sampler)[(step - 1) * config.batch_size]


@pytest.fixture
def poison_example(monkeypatch):
    """``poison(i)``: from now on, training features of example ``i`` of the split are NaN."""
    def poison(index: int):
        original = FeatureExtractor.__call__

        def call(self, batch):
            features = original(self, batch)
            hit = batch.indices == index
            if torch.is_grad_enabled() and hit.any():  # training passes only (evaluation runs without grad)
                features.phi = features.phi.masked_fill(hit.view(-1, 1, 1), float("nan"))
            return features

        monkeypatch.setattr(FeatureExtractor, "__call__", call)
    return poison


def _finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_nan_features_stop_at_their_step_and_keep_the_last_good_checkpoint(tmp_path, data_dir, poison_example):
    config = tiny_config(data_dir, steps=6, checkpoint_every=1)
    poison_example(_example_of_step(config, 3))
    run = tmp_path / "run"
    with pytest.raises(NumericalError) as info:
        run_fit(config, run, **QUIET)
    message = str(info.value)
    assert message.startswith("training step 3: features contain NaN or Inf")
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-00000002'}" in message
    assert "--resume --on-nan skip" in message
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000001", "step-00000002"]
    assert latest_checkpoint(run).name == "step-00000002"
    tensors, state, step = load_checkpoint(run)
    assert step == 2 and _finite(tensors) and all(math.isfinite(x) for x in state["trace"])
    assert not (run / "metrics.json").exists()

    # the advice works: resume with --on-nan skip; the poisoned batch is skipped and counted
    config.on_nan = "skip"
    metrics = run_fit(config, run, resume=True, **QUIET)
    faults = metrics["train"]["faults"]
    assert faults["on_nan"] == "skip" and faults["skipped_batches"] == 1 and faults["skipped_steps"] == [3]
    trace = metrics["elbo_trace"]
    assert len(trace) == 6 and math.isnan(trace[2]) and all(math.isfinite(x) for i, x in enumerate(trace) if i != 2)
    assert json.loads((run / "metrics.json").read_text())["train"]["faults"] == faults


def test_too_many_skipped_batches_stop_the_run(tmp_path, data_dir, poison_example):
    config = tiny_config(data_dir, steps=4, checkpoint_every=1, on_nan="skip", max_skipped_batches=0)
    poison_example(_example_of_step(config, 2))
    with pytest.raises(NumericalError, match=r"^training step 2: features contain NaN.* 1 batches skipped \(steps "
                                             r"\[2\]\), more than --max-skipped-batches 0: the run diverges"):
        run_fit(config, tmp_path / "run", **QUIET)


# ----------------------------------------------------------------------------- one guarded step at a time
def _pipeline(data_dir, **overrides):
    config = tiny_config(data_dir, **overrides)
    pipe = build_pipeline(config)
    warm_prefix_cache(pipe.method, pipe.train, pipe.tokenizer, 8)
    loader = epoch_loader(pipe.train, pipe.tokenizer, config.batch_size, config.seed)
    loader.sampler.set_epoch(0)
    return pipe, list(loader)


def _state(method) -> tuple[dict, dict]:
    return copy.deepcopy((method.state_tensors(), method.optimizer_state()))


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b or (a != a and b != b), path


def _nan_adapter_loss(pipe):
    """The adapter step's loss turns NaN (polar-vbll: after the guide step of the batch has moved q)."""
    step = next(s for s in pipe.method.steps if isinstance(s, AdapterStep))
    real = step.loss_fn
    step.loss_fn = lambda features, labels: real(features, labels) * float("nan")
    return r"(neg_elbo|nll) is not finite", lambda: setattr(step, "loss_fn", real)


@pytest.mark.parametrize("method", ["polar-vbll", "lora-mle"])
def test_a_skipped_batch_is_undone_exactly(data_dir, method):
    """Skipping batch 3 leaves adapters, head, optimisers and schedules as if it never came (Jensen: no RNG)."""
    pipe, batches = _pipeline(data_dir, method=method, on_nan="skip")
    guard = TrainingGuard.from_config(pipe.method, pipe.config)
    for step in range(2):
        guard.train_step(batches[step], step)
    before = _state(pipe.method)
    expected, restore = _nan_adapter_loss(pipe)
    with pytest.warns(Warning, match=rf"skipped training step 3 \(its updates undone\): {expected}"):
        assert guard.train_step(batches[2], 2) == {}
    restore()
    _assert_same(before, _state(pipe.method))
    guard.train_step(batches[3], 3)
    assert guard.report()["skipped_steps"] == [3] and guard.report()["skipped_batches"] == 1
    skipped = _state(pipe.method)

    clean, _ = _pipeline(data_dir, method=method, on_nan="skip")  # (clears Pyro's global parameter store)
    other = TrainingGuard.from_config(clean.method, clean.config)
    for step in (0, 1, 3):
        other.train_step(batches[step], step)
    _assert_same(skipped, _state(clean.method))


def _nan_grad_hook(pipe):
    name, layer = next(polar_layers(pipe.model))
    layer.polar_theta.register_hook(lambda grad: grad * float("nan"))
    return r"gradients of the loss neg_elbo are not finite in 1 of 6 parameter tensors \(shapes \[\(4, 4\)\]\)"


def _nan_guide_grad_hook(pipe):
    name, param = next(iter(pipe.method.head.parameters().items()))  # the head's own (scoped) store
    param.register_hook(lambda grad: grad * float("nan"))
    return rf"gradients of the guide parameters \['{name}'\] are not finite"


def _infinite_lr(pipe):
    for group in pipe.method.optimizer.param_groups:
        group["lr"] = float("inf")
    return (r"parameters became NaN or Inf after the update: adapter\.model\.layers\.1\.self_attn\.q_proj\.polar_X, "
            r".*polar_Y, .*polar_theta and 3 more\. Pass on_nan='skip'")


def _nan_head_loss(pipe):
    return _nan_adapter_loss(pipe)[0]


@pytest.mark.parametrize("inject", [_nan_grad_hook, _nan_guide_grad_hook, _infinite_lr, _nan_head_loss])
def test_faults_in_gradients_loss_and_parameters_stop_at_their_step(data_dir, inject):
    pipe, batches = _pipeline(data_dir)
    guard = TrainingGuard.from_config(pipe.method, pipe.config)
    guard.train_step(batches[0], 0)
    expected = inject(pipe)
    with pytest.raises(NumericalError, match=rf"^training step 2: {expected}"):
        guard.train_step(batches[1], 1)


# ----------------------------------------------------------------------------- Stiefel factors
def test_drift_off_the_manifold_is_projected_back_and_logged(data_dir):
    """Landing (no retraction, unlike Riemannian Adam's QR) leaves a perturbed Y off the manifold: the guard projects."""
    pipe, batches = _pipeline(data_dir, adapter_optimizer="landing", lr=1e-4)
    lines = []
    guard = TrainingGuard(pipe.method, orthogonality_tol=1e-2, log=lines.append)
    name, layer = next(polar_layers(pipe.model))
    with torch.no_grad():
        layer.polar_Y.add_(0.05 * torch.randn_like(layer.polar_Y))
    drift = orthogonality_error(layer)["Y"]
    assert drift > 1e-2
    guard.train_step(batches[0], 0)
    assert orthogonality_error(layer)["Y"] < 1e-5 and orthogonality_error(layer)["X"] < 1e-2  # X: landing drift only
    [entry] = guard.report()["reorthonormalised"]
    assert entry["step"] == 1 and entry["layer"] == name and entry["factor"] == "Y" and entry["error"] > 1e-2
    assert lines == [f"step 1: re-orthonormalised {name}.polar_Y (||Y^T Y - I||_F = {entry['error']:.3g} > 0.01)"]


def test_reorthonormalisations_are_counted_in_metrics(tmp_path, data_dir):
    """The landing optimiser never retracts: with a tight tolerance every step projects X and Y back."""
    lines = []
    config = tiny_config(data_dir, steps=3, adapter_optimizer="landing", orthogonality_tol=1e-9, lr=1e-2,
                         checkpoint_every=0)
    metrics = run_fit(config, tmp_path / "run", progress=False, log=lines.append)
    faults = metrics["train"]["faults"]
    assert faults["orthogonality_tol"] == 1e-9 and faults["reorthonormalisations"] == len(faults["reorthonormalised"])
    assert faults["reorthonormalisations"] >= 3
    assert {entry["step"] for entry in faults["reorthonormalised"]} == {1, 2, 3}
    assert sum("re-orthonormalised" in line for line in lines) == faults["reorthonormalisations"]
    default = run_fit(tiny_config(data_dir, steps=3, checkpoint_every=0), tmp_path / "default", **QUIET)
    assert default["train"]["faults"]["reorthonormalisations"] == 0  # Riemannian Adam stays on the manifold
    assert default["train"]["faults"]["orthogonality_tol"] == 1e-4
