"""The main job on the real model and data, shrunk to a minute: SmolLM2-135M, ARC-Easy, options format."""
import json

import pytest

from bayes_polar.config import FitConfig
from bayes_polar.run import run_fit

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_polar_vbll_fits_smollm2_on_arc_easy(tmp_path, data_dir):
    config = FitConfig(model="smollm2-135m", task="arc_easy", data_dir=str(data_dir), format="options",
                       method="polar-vbll", train_limit=48, eval_limit=64, steps=12, batch_size=8, layers="-1",
                       max_length=128, threads=1, checkpoint_every=6, warmup_steps=2, predictive_samples=128)
    run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    result = metrics["evaluations"]["arc_easy/validation"]
    assert result["n"] == 64 and result["truncated"] == 0
    # ARC-Easy has 4 options (a few 3 or 5): chance is about 0.25; the LM alone already scores well above it
    assert result["zero_shot"]["acc"] > 0.35 and result["acc"] > 0.35
    # the zero-shot LM is overconfident (NLL ~2.3 > log 4); a dozen steps on 48 questions already lower the NLL
    assert 0 <= result["ece"] <= 100 and 0 < result["nll"] < result["zero_shot"]["nll"]
    assert len(metrics["elbo_trace"]) == 12 and all(map(lambda x: x == x, metrics["elbo_trace"]))
    for layer in metrics["adapters"].values():  # the Stiefel factors stay orthonormal on the real model
        assert layer["orthogonality_error_X"] < 1e-4 and layer["orthogonality_error_Y"] < 1e-4
    assert sorted(metrics["adapters"]) == ["model.layers.29.self_attn.q_proj", "model.layers.29.self_attn.v_proj"]
