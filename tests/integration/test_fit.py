"""End to end on the tiny random Llama: fit + evaluate round trip, the ELBO rises, resume is exact."""
import json

import pytest
import torch

from bayes_polar.training.checkpoint import load_checkpoint, save_checkpoint
from bayes_polar.config import FitConfig
from bayes_polar.run import build_pipeline, evaluate_run, load_run, predict, run_fit, encode_eval
from bayes_polar.training.loop import epoch_loader, fit, restore_training_state, training_state, warm_prefix_cache

pytestmark = pytest.mark.integration


def tiny_config(data_dir, **overrides):
    values = dict(model="tiny-random-llama", task="arc_easy", data_dir=str(data_dir), train_limit=24,
                  eval_limit=12, steps=8, batch_size=4, layers="-1", rank=4, alpha=8, threads=1,
                  checkpoint_every=4, max_length=96, eval_batch_size=8, predictive_samples=64,
                  warmup_steps=2, lr=5e-3, head_lr=5e-2)
    values.update(overrides)
    return FitConfig(**values)


def test_fit_then_evaluate_round_trip(tmp_path, data_dir):
    config = tiny_config(data_dir, eval_tasks="arc_easy,openbookqa:validation")
    metrics = run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.json", "reliability_arc_easy.png", "reliability_openbookqa.png",
                 "elbo.png", "adapters.safetensors", "head.safetensors", "selective_arc_easy.png",
                 "selective_openbookqa.png"):
        assert (run / name).stat().st_size > 0, name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    result = saved["evaluations"]["arc_easy/validation"]
    assert {"acc", "ece", "ace", "mce", "cw_ece", "nll", "brier", "n", "point", "zero_shot"} <= set(result)
    assert result["n"] == 12
    assert set(result["selective"]) == {"aurc", "e_aurc", "acc@80", "acc@90"}
    assert set(result["uncertainty"]) == {"max_prob", "entropy", "aleatoric", "mutual_information", "logit_variance",
                                          "spread", "novelty"}
    assert "ood" not in result  # the training task's split is the in-distribution reference
    ood = saved["evaluations"]["openbookqa/validation"]["ood"]
    assert ood["against"] == "arc_easy/validation" and set(ood["auroc"]) == set(result["uncertainty"])
    assert all(0 <= v <= 1 for m in ("auroc", "aupr") for v in ood[m].values())
    assert len(saved["elbo_trace"]) == 8
    layer = next(iter(saved["adapters"].values()))
    assert {"stable_rank", "orthogonality_error_X", "orthogonality_error_Y"} <= set(layer)
    assert layer["orthogonality_error_X"] < 1e-5

    added = evaluate_run(run, "arc_challenge", data_dir=data_dir, limit=10, log=lambda *_: None)
    assert added["n"] == 10
    evaluations = json.loads((run / "metrics.json").read_text())["evaluations"]
    assert set(evaluations) == {"arc_easy/validation", "openbookqa/validation", "arc_challenge/validation"}
    assert evaluations["arc_challenge/validation"]["ood"]["against"] == "arc_easy/validation"  # evaluate adds it too

    reloaded = load_run(run)  # the saved adapters and head give the same point predictions
    encoded = encode_eval(reloaded, "arc_easy", "validation")
    point = predict(reloaded, encoded, 16)["point"]
    from bayes_polar.evaluation.metrics import classification_metrics
    assert classification_metrics(point, torch.tensor([e.label for e in encoded.task.examples]))["nll"] == \
        pytest.approx(result["point"]["nll"], abs=1e-5)


def test_run_dir_is_not_overwritten_without_the_flag(tmp_path, data_dir):
    config = tiny_config(data_dir, steps=1, eval_limit=4)
    run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    from bayes_polar.errors import ConfigError
    with pytest.raises(ConfigError, match="--overwrite"):
        run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)


def test_elbo_rises(data_dir):
    config = tiny_config(data_dir, train_limit=32, steps=40, checkpoint_every=0, schedule="constant",
                         warmup_steps=0)
    pipe = build_pipeline(config)
    trace = []
    fit(pipe.method, epoch_loader(pipe.train, pipe.tokenizer, 4, 0), 40,
        callback=lambda step, logs: trace.append(logs["elbo"]))
    assert sum(trace[-8:]) / 8 > sum(trace[:8]) / 8 + 0.05, trace


def _train(config, until, stop=None, state=None, key="elbo"):
    """Train ``config`` to step ``until`` (stopping after ``stop``, resuming ``state``): pipe, step, ``key`` trace."""
    pipe = build_pipeline(config)
    warm_prefix_cache(pipe.method, pipe.train, pipe.tokenizer, 8)
    step, trace = 0, []
    if state is not None:
        step, trace = restore_training_state(pipe.method, *state)
    loader = epoch_loader(pipe.train, pipe.tokenizer, config.batch_size, config.seed)

    def callback(done, logs):
        trace.append(logs[key])
        return stop is not None and done >= stop

    step = fit(pipe.method, loader, until, step, callback)
    return pipe, step, trace


@pytest.mark.parametrize("elbo", ["jensen", "mc"])
def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, data_dir, elbo):
    config = tiny_config(data_dir, elbo=elbo, train_limit=20, steps=11)  # 5 batches/epoch: resume mid-epoch
    straight, _, straight_trace = _train(config, 11)
    first, step, _ = _train(config, 11, stop=7)
    assert step == 7
    save_checkpoint(tmp_path, *training_state(first.method, step, [0.0] * 7), step=step)
    tensors, state, _ = load_checkpoint(tmp_path)
    resumed, step, resumed_trace = _train(config, 11, state=(tensors, state))
    assert step == 11
    assert resumed_trace[7:] == straight_trace[7:]
    expected, got = straight.method.state_tensors(), resumed.method.state_tensors()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
