"""A bfloat16 backbone end to end on the CPU (the GPU setting of our users, at the tiny Llama's size)."""
import json

import pytest
import torch

from bayes_polar.adapters import polar_layers
from bayes_polar.data.formats import make_loader
from bayes_polar.run import encode_eval, load_run, run_fit

from .test_fit import tiny_config

pytestmark = pytest.mark.integration


def _check_placement(pipe):
    layers = [layer for _, layer in polar_layers(pipe.model)]
    assert layers
    for layer in layers:
        assert layer.base_layer.weight.dtype == torch.bfloat16
        for p in (layer.polar_X, layer.polar_Y, layer.polar_theta):
            assert p.dtype == torch.float32
        eye = torch.eye(layer.r)
        assert torch.linalg.matrix_norm(layer.polar_X.T @ layer.polar_X - eye) < 1e-5
        assert torch.linalg.matrix_norm(layer.polar_Y.T @ layer.polar_Y - eye) < 1e-5


def test_bfloat16_backbone_fit_evaluate_resume(tmp_path, data_dir):
    config = tiny_config(data_dir, dtype="bfloat16", device="cpu", steps=6, checkpoint_every=3)
    metrics = run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    assert metrics["backbone"] == {"device": "cpu", "dtype": "bfloat16"}
    result = metrics["evaluations"]["arc_easy/validation"]
    assert all(torch.isfinite(torch.tensor(result[k])) for k in ("acc", "ece", "nll", "brier"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["device"] == "cpu"

    pipe = load_run(tmp_path / "run")
    _check_placement(pipe)
    batch = next(iter(make_loader(encode_eval(pipe, "arc_easy", "validation", limit=4), pipe.tokenizer, batch_size=4)))
    features = pipe.method.features(batch)
    assert features.phi.dtype == torch.float32 and torch.isfinite(features.phi).all()
    assert load_run(tmp_path / "run", dtype="float32").model.get_input_embeddings().weight.dtype == torch.float32

    # kill after the first checkpoint (remove what came later), resume: the same adapters and head
    import shutil

    from bayes_polar.training.checkpoint import latest_checkpoint

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    for name in ("adapters.safetensors", "head.safetensors", "metrics.json"):
        (resumed / name).unlink()
    checkpoints = sorted(p for p in (resumed / "checkpoints").iterdir() if p.is_dir())
    for later in checkpoints[1:]:
        shutil.rmtree(later)
    (resumed / "checkpoints" / "latest.json").unlink(missing_ok=True)
    assert "step-00000003" in str(latest_checkpoint(resumed))
    again = run_fit(config, resumed, resume=True, progress=False, log=lambda *_: None)
    assert again["evaluations"]["arc_easy/validation"] == result


def test_gradient_checkpointing_gives_the_same_step(data_dir):
    """Recomputing the adapted blocks' activations changes memory, not the update."""
    from bayes_polar.run import build_pipeline
    from bayes_polar.training.loop import epoch_loader

    states, counts = [], []
    for checkpointing in (False, True):
        config = tiny_config(data_dir, gradient_checkpointing=checkpointing, steps=2, layers="-2,-1")
        pipe = build_pipeline(config)
        assert pipe.model.is_activation_checkpointing == checkpointing
        batch = next(iter(epoch_loader(pipe.train, pipe.tokenizer, config.batch_size, config.seed)))
        pipe.method.features(batch)  # fills the prefix cache outside the count
        calls, mlp = [], pipe.model.model.layers[-1].mlp
        forward = mlp.forward
        mlp.forward = lambda x: calls.append(1) or forward(x)  # hooks do not fire in the recompute; this does
        pipe.method.train_step(batch, 0)
        del mlp.forward
        counts.append(len(calls))
        states.append({k: v for k, v in pipe.method.state_tensors().items() if k.startswith("adapter.")})
    assert counts[1] > counts[0], f"the checkpointed block is recomputed in the backward pass: {counts}"
    assert states[0].keys() == states[1].keys() and states[0]
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-5, atol=1e-6, msg=name)
