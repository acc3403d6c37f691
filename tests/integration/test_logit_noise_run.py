"""A run with VBLL's logit noise trains, saves the noise with the head and reloads it."""
import pytest
import torch

from bayes_polar.bll.logit_noise import SITE
from bayes_polar.run import load_run, run_fit

from .test_fit import tiny_config

pytestmark = pytest.mark.integration


def test_logit_noise_run_round_trip(tmp_path, data_dir):
    from safetensors.torch import load_file

    config = tiny_config(data_dir, steps=3, eval_limit=4, logit_noise=True)
    metrics = run_fit(config, tmp_path / "run", progress=False, log=lambda *_: None)
    assert all(torch.isfinite(torch.tensor(metrics["elbo_trace"])))
    saved = load_file(tmp_path / "run" / "head.safetensors")[f"head.{SITE}"]
    head = load_run(tmp_path / "run").method.head
    assert head.model.logit_noise is not None and torch.equal(head.state_tensors()[SITE], saved)
