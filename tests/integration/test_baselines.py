"""Baselines and training options on the tiny random Llama: schedules, Laplace, ensembles, MC dropout, options."""
import json
import math
from dataclasses import replace

import pyro
import pytest
import torch

from bayes_polar.config import POLAR_LR_FACTOR, STIEFEL_LR
from bayes_polar.bll.laplace import fit_laplace
from bayes_polar.data.formats import make_loader
from bayes_polar.run import build_pipeline, encode_eval, load_run, predict, run_fit, split_features
from bayes_polar.training.loop import epoch_loader, fit
from bayes_polar.training.methods import VariationalHead

from .test_fit import tiny_config

pytestmark = pytest.mark.integration

QUIET = dict(progress=False, log=lambda *_: None)


def _learning_rates(config) -> list[tuple[float, float]]:
    """(adapter lr, head lr) after each outer training step."""
    pipe = build_pipeline(config)
    method, seen = pipe.method, []

    def head_lr():
        if isinstance(method.head, VariationalHead):
            with method.head.scope():
                rates = {s.optimizer.param_groups[0]["lr"] for s in method.head.optim.optim_objs.values()}
            assert len(rates) == 1
            return rates.pop()
        return next(g["lr"] for g in method.optimizer.param_groups if g.get("name") == "head")

    def callback(done, logs):
        seen.append((method.optimizer.param_groups[0]["lr"], head_lr()))
        return False

    fit(method, epoch_loader(pipe.train, pipe.tokenizer, config.batch_size, config.seed), config.steps,
        callback=callback)
    return seen


@pytest.mark.parametrize("method", ["polar-vbll", "lora-mle"])
def test_schedules_advance_once_per_outer_step(data_dir, method):
    """guide_steps = adapter_steps = 2 and a head warm-up leave every learning rate where the plain run has it."""
    common = dict(method=method, steps=6, warmup_steps=2, schedule="linear")
    config = tiny_config(data_dir, **common)
    plain = _learning_rates(config)
    pyro.clear_param_store()
    repeated = _learning_rates(tiny_config(data_dir, guide_steps=2, adapter_steps=2, head_warmup_steps=2, **common))
    assert repeated == plain
    factors = [1 - (s - 2) / 4 for s in range(2, 7)]  # after step s + 1: warm-up over 2 steps, then linear decay
    adapter_lr = config.adapter_learning_rates[0] if method.startswith("polar") else config.lr  # first group
    expected = [(adapter_lr * f, config.head_lr * f) for f in factors[:1] + factors]
    assert [x for pair in plain for x in pair] == pytest.approx([x for pair in expected for x in pair])


@pytest.mark.parametrize("method", ["polar-vbll-la", "lora-laplace"])
def test_laplace_fits_tune_the_precision_around_the_prior_mean(tmp_path, data_dir, method):
    """Both Laplace methods: δ maximises the evidence of N(m, δ⁻¹I) with m the (non-zero) lm_head prior mean."""
    run_fit(tiny_config(data_dir, method=method, prior="lm_head", steps=3), tmp_path / "run", **QUIET)
    pipe = load_run(tmp_path / "run")
    mean = pipe.method.prior_mean()
    assert mean.abs().sum() > 0
    features, labels, _ = split_features(pipe, split="train")
    _, expected = fit_laplace(pipe.method.head_mean(), features.phi, labels, features.mask, "marglik",
                              prior_loc=mean)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["laplace_prior_precision"]
    assert saved == pytest.approx(expected, rel=1e-6)


def test_ensemble_predicts_the_mean_of_distinct_members(tmp_path, data_dir):
    run_fit(tiny_config(data_dir, method="lora-ensemble", ensemble_size=3, steps=3), tmp_path / "run", **QUIET)
    pipe = load_run(tmp_path / "run")
    batch = next(iter(make_loader(encode_eval(pipe, "arc_easy", "validation"), pipe.tokenizer, batch_size=8)))
    members = []
    for tensors in pipe.method.members:
        pipe.method.method.load_state_tensors(tensors)
        members.append(pipe.method.method.predict(batch, 16)[0])
    for i in range(3):
        for j in range(i):
            assert not torch.allclose(members[i], members[j], atol=1e-4)
    torch.testing.assert_close(pipe.method.predict(batch, 16)[0], torch.stack(members).mean(0))


def test_mc_dropout_passes_differ(tmp_path, data_dir):
    run_fit(tiny_config(data_dir, method="lora-mcdropout", dropout=0.3, mc_passes=4, steps=2), tmp_path / "run",
            **QUIET)
    pipe = load_run(tmp_path / "run")
    method = pipe.method
    batch = next(iter(make_loader(encode_eval(pipe, "arc_easy", "validation"), pipe.tokenizer, batch_size=8)))
    method.model.train()
    passes = [method.head.predict_proba(method.features(batch)) for _ in range(3)]
    assert not torch.allclose(passes[0], passes[1]) and not torch.allclose(passes[1], passes[2])
    mean, point = method.predict(batch, 16)  # point: one deterministic (eval-mode) pass
    assert not torch.allclose(mean, point)
    torch.manual_seed(5)
    again = method.predict_proba(batch, 16)
    torch.manual_seed(5)
    torch.testing.assert_close(method.predict_proba(batch, 16), again)


@pytest.mark.parametrize("options", [dict(kl_weight=0.1), dict(mode="joint"), dict(head_init="prior"),
                                     dict(guide_steps=2, adapter_steps=3)],
                         ids=["kl_weight", "joint", "head_init_prior", "repeated_steps"])
def test_training_option_runs(tmp_path, data_dir, options):
    metrics = run_fit(tiny_config(data_dir, steps=3, **options), tmp_path / "run", **QUIET)
    assert len(metrics["elbo_trace"]) == 3 and all(math.isfinite(x) for x in metrics["elbo_trace"])
    assert metrics["evaluations"]["arc_easy/validation"]["nll"] > 0


@pytest.mark.parametrize("optimizer", ["riemannian_adam", "landing"])
def test_polar_learning_rates_and_landing_lambda_reach_the_optimiser(data_dir, optimizer):
    config = tiny_config(data_dir, method="polar-mle", adapter_optimizer=optimizer, lr=1e-3, stiefel_lr=2e-2,
                         theta_lr=3e-3, landing_lambda=0.5, warmup_steps=0, schedule="constant")
    groups = {g["name"]: g for g in build_pipeline(config).method.optimizer.param_groups}
    assert (groups["stiefel"]["lr"], groups["euclidean"]["lr"], groups["head"]["lr"]) == (2e-2, 3e-3, config.head_lr)
    assert groups["stiefel"].get("landing_lambda") == (0.5 if optimizer == "landing" else None)
    pyro.clear_param_store()
    lora = {g["name"]: g for g in build_pipeline(replace(config, method="lora-mle")).method.optimizer.param_groups}
    assert lora["euclidean"]["lr"] == 1e-3 and "stiefel" not in lora


def test_polar_learning_rates_default_to_the_protocol_s_choice(data_dir):
    """The defaults the results table's dev split chose for polar-vbll: X, Y at STIEFEL_LR = 0.1 whatever lr
    (a Frobenius step length under RiemannianAdam), Θ at 10 x lr; an explicit rate still wins."""
    config = tiny_config(data_dir, method="polar-vbll", lr=2e-3, warmup_steps=0, schedule="constant")
    assert (STIEFEL_LR, POLAR_LR_FACTOR) == (0.1, 10) and config.adapter_learning_rates == (0.1, 2e-2)
    assert replace(config, lr=1e-3).adapter_learning_rates == (0.1, 1e-2)
    groups = {g["name"]: g["lr"] for g in build_pipeline(config).method.optimizer.param_groups}
    assert (groups["stiefel"], groups["euclidean"]) == pytest.approx((0.1, 2e-2))
    assert replace(config, theta_lr=1e-3).adapter_learning_rates == pytest.approx((0.1, 1e-3))
    assert replace(config, stiefel_lr=3e-2).adapter_learning_rates == pytest.approx((3e-2, 2e-2))
    # landing's AdamW steps every entry by lr, as LoRA's: there X, Y keep 10 x lr
    assert replace(config, adapter_optimizer="landing").adapter_learning_rates == pytest.approx((2e-2, 2e-2))
