"""The fitted start of a run: feature scaling (saved, restored) and a head no worse than uniform on the training split."""

import pytest
import torch

from bayes_polar.adapters import adapters_disabled
from bayes_polar.bll.model import head_logits, prior_scale
from bayes_polar.data.formats import make_loader
from bayes_polar.data.normalization import SCALE_KEY
from bayes_polar.run import build_pipeline, load_run, run_fit, split_features
from bayes_polar.training.head_start import nll, uniform_nll
from bayes_polar.training.loop import restore_training_state, training_state
from bayes_polar.training.trainable_heads import zero_shot_weights

from .test_fit import tiny_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("method", ["polar-vbll", "lora-mle"])
def test_the_head_starts_no_worse_than_uniform_on_the_training_split(data_dir, method):
    pipe = build_pipeline(tiny_config(data_dir, method=method, train_limit=48))
    features, labels, _ = split_features(pipe, split="train")
    start = nll(pipe.method.head_mean(), features.phi, features.mask, labels)
    assert start <= uniform_nll(features.mask) + 1e-6
    report = pipe.method.extras["head_start"]  # written to metrics.json
    assert report["nll"] == pytest.approx(start, abs=1e-5) and report["uniform_nll"] == pytest.approx(uniform_nll(features.mask), abs=1e-6)
    raw = nll(pipe.zero_shot, features.phi, features.mask, labels)  # the untempered zero-shot head
    assert raw > uniform_nll(features.mask), "the case the fitted temperature is for"


def test_zero_shot_classifier_is_unchanged_by_standardisation(data_dir):
    pipe = build_pipeline(tiny_config(data_dir))
    extractor = pipe.method.extractor
    assert extractor.scaling is not None and not torch.allclose(extractor.scaling.scale, torch.ones(1))
    raw_weights = zero_shot_weights("options", extractor.feature_dim)
    batch = next(iter(make_loader(pipe.train, pipe.tokenizer, batch_size=8)))
    with torch.no_grad(), adapters_disabled(pipe.model):
        raw = extractor.raw(batch)
        expected = head_logits(raw_weights, raw.phi, raw.mask).softmax(-1)
    torch.testing.assert_close(pipe.method.zero_shot_proba(batch, pipe.zero_shot), expected, atol=1e-5, rtol=1e-4)


def test_guide_starts_at_a_fraction_of_the_prior_scale(data_dir):
    pipe = build_pipeline(tiny_config(data_dir, guide="diagonal", guide_init_scale=0.3))
    head = pipe.method.head
    expected = 0.3 * prior_scale(head.model.prior, head.model.in_features, 1)
    torch.testing.assert_close(head.posterior().variance().sqrt(), torch.full((1, head.model.in_features), expected))


def test_feature_scaling_is_saved_with_the_head_and_restored(tmp_path, data_dir):
    from safetensors.torch import load_file

    config = tiny_config(data_dir, steps=2, eval_limit=4)
    run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    saved = load_file(tmp_path / "run" / "head.safetensors")[SCALE_KEY]
    fitted = build_pipeline(config).method.extractor.scaling.scale
    torch.testing.assert_close(saved, fitted)
    assert torch.equal(load_run(tmp_path / "run").method.extractor.scaling.scale, saved)

    other = build_pipeline(tiny_config(data_dir, train_limit=12))  # a different training split, another scaling
    assert not torch.allclose(other.method.extractor.scaling.scale, saved)
    restore_training_state(other.method, *training_state(build_pipeline(config).method, 0, []))  # as --resume does
    assert torch.equal(other.method.extractor.scaling.scale, saved)

    unscaled = tiny_config(data_dir, steps=1, eval_limit=4, feature_standardization=False)
    run_fit(unscaled, tmp_path / "plain", progress=False, log=lambda *_: None)
    assert SCALE_KEY not in load_file(tmp_path / "plain" / "head.safetensors")
    assert load_run(tmp_path / "plain").method.extractor.scaling is None
