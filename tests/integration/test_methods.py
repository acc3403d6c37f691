"""Every method of the baselines table fits, evaluates and writes its metrics on the tiny random Llama."""
import json

import pytest
import torch
from safetensors.torch import load_file

from bayes_polar.config import METHODS
from bayes_polar.data.formats import make_loader
from bayes_polar.run import load_run, predict, encode_eval, run_fit

from .test_fit import tiny_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("method", METHODS)
def test_method_fits_evaluates_and_reloads(tmp_path, data_dir, method):
    config = tiny_config(data_dir, method=method, steps=4, ensemble_size=2, mc_passes=3, dropout=0.2,
                         weight_decay=0.01, train_limit=20)
    metrics = run_fit(config, tmp_path / method, progress=False, log=lambda *_: None)
    result = metrics["evaluations"]["arc_easy/validation"]
    assert result["n"] == 12 and 0 <= result["ece"] <= 100 and result["nll"] > 0
    saved = json.loads((tmp_path / method / "metrics.json").read_text())
    assert saved["method"] == method
    if method == "temperature-scaling":
        assert saved["temperature"] > 0
    if method in ("polar-vbll-la", "lora-laplace"):
        assert saved["laplace_prior_precision"] > 0
    if method == "lora-ensemble":
        assert (tmp_path / method / "members" / "1" / "head.safetensors").exists()

    pipe = load_run(tmp_path / method)  # what was saved predicts, seeded, exactly what was measured
    encoded = encode_eval(pipe, "arc_easy", "validation")
    again = predict(pipe, encoded, config.predictive_samples, seed=config.seed)
    saved = load_file(tmp_path / method / "predictions.safetensors")
    torch.testing.assert_close(again["predictive"], saved["arc_easy/validation/probs"], rtol=0, atol=1e-6)
    torch.testing.assert_close(again["point"], saved["arc_easy/validation/point"], rtol=0, atol=1e-6)
    scores = again["scores"]  # per question, from the method's own draws
    assert all(v.shape == (12,) for v in scores.values())
    torch.testing.assert_close(scores["entropy"], scores["aleatoric"] + scores["mutual_information"])
    if method in ("lora-mle", "lora-map", "polar-mle", "temperature-scaling"):
        assert (scores["mutual_information"] == 0).all()  # one draw
    else:  # last-layer draws, members or dropout passes
        assert (scores["mutual_information"] > 0).any()
    gaussian = method in ("polar-vbll", "polar-vbll-la", "lora-vbll", "lora-laplace")
    assert {"logit_variance", "spread", "novelty"} <= set(scores) if gaussian else "logit_variance" not in scores
    if gaussian:  # the spread / novelty split reads the head's own (centred, scaled) features
        torch.testing.assert_close(scores["logit_variance"] > 0, scores["novelty"] > 0)
        batch = next(iter(make_loader(encoded, pipe.tokenizer, batch_size=4)))
        drawn = pipe.method.predict_samples(batch, 8)
        features = pipe.method.features(batch)
        torch.testing.assert_close(drawn["feature_norm2"], features.phi.pow(2).sum(-1) * features.mask)


def test_zero_shot_row_is_the_base_model(tmp_path, data_dir):
    """The zero-shot metrics do not depend on the trained adapters."""
    a = run_fit(tiny_config(data_dir, steps=2), tmp_path / "a", progress=False, log=lambda *_: None)
    b = run_fit(tiny_config(data_dir, steps=6, lr=2e-2), tmp_path / "b", progress=False, log=lambda *_: None)
    za, zb = a["evaluations"]["arc_easy/validation"]["zero_shot"], b["evaluations"]["arc_easy/validation"]["zero_shot"]
    assert za["nll"] == pytest.approx(zb["nll"], abs=1e-5)
    assert a["evaluations"]["arc_easy/validation"]["point"]["nll"] != pytest.approx(za["nll"], abs=1e-5)
