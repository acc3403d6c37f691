"""lora-blob and polar-blob in the harness: the ELBO's KL in the adapter step, sampled predictive passes,
bit-identical resume, Stiefel factors kept orthonormal."""
import pytest
import torch

from bayes_polar.adapters import adapter_state_dict, orthogonality_error, polar_layers
from bayes_polar.adapters.blob import adapter_kl, bayesian_layers, softplus_inverse
from bayes_polar.data.formats import make_loader
from bayes_polar.run import build_pipeline
from bayes_polar.training.blob_loss import BlobLoss
from bayes_polar.training.checkpoint import load_checkpoint, save_checkpoint
from bayes_polar.training.loop import training_state

from .test_fit import _train as train_to, tiny_config

pytestmark = pytest.mark.integration
BLOB = ["lora-blob", "polar-blob"]


def _train(config, until, stop=None, state=None):
    return train_to(config, until, stop, state, key="neg_elbo")


@pytest.mark.parametrize("method", BLOB)
def test_resume_is_bit_identical(tmp_path, data_dir, method):
    config = tiny_config(data_dir, method=method, train_limit=20, steps=9)  # 5 batches/epoch: resume mid-epoch
    straight, _, straight_trace = _train(config, 9)
    first, step, _ = _train(config, 9, stop=6)
    save_checkpoint(tmp_path, *training_state(first.method, step, [0.0] * step), step=step)
    tensors, state, _ = load_checkpoint(tmp_path)
    assert any(key.endswith("_rho") or "_rho." in key for key in tensors), "σ parameters are checkpointed"
    resumed, step, resumed_trace = _train(config, 9, state=(tensors, state))
    assert step == 9 and resumed_trace[6:] == straight_trace[6:]
    expected, got = straight.method.state_tensors(), resumed.method.state_tensors()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize("method", BLOB)
def test_adapter_step_minimises_nll_plus_reweighted_kl_over_n(data_dir, method):
    pipe = build_pipeline(tiny_config(data_dir, method=method, train_limit=20, batch_size=4))
    loss = pipe.method.steps[0].loss_fn
    assert isinstance(loss, BlobLoss) and loss.period == 5  # ⌈20 / 4⌉ minibatches per epoch
    batch = next(iter(make_loader(pipe.train, pipe.tokenizer, batch_size=4)))
    pipe.method.model.eval()  # the posterior mean: no sampling, so both sides see the same features
    features = pipe.method.features(batch)
    for step in range(3):
        kl, weight = adapter_kl(pipe.method.model), loss.kl_factor()
        assert kl > 0
        assert weight == pytest.approx(5 * 2.0 ** (step + 1 - 6) / (1 - 2.0 ** -6) / 20)
        assert loss(features, batch.labels).item() == pytest.approx(
            (pipe.method.head.loss(features, batch.labels) + weight * kl).item(), rel=1e-6)
        pipe.method.train_step(batch, step)


def _noisy(pipe):
    """Bayesian adapters with visible noise (B or Θ away from 0, σ = 0.1): the predictive test needs it."""
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in bayesian_layers(pipe.method.model):
            if hasattr(layer, "lora_A_rho"):
                layer.lora_B["default"].weight.normal_(0, 0.5)
                layer.lora_A_rho["default"].fill_(float(softplus_inverse(torch.tensor(0.1))))
            else:
                layer.polar_theta.normal_(0, 0.5)
                layer.polar_theta_rho.fill_(float(softplus_inverse(torch.tensor(0.1))))


@pytest.mark.parametrize("method", BLOB)
def test_sampled_passes_differ_and_their_mean_converges(data_dir, method):
    pipe = build_pipeline(tiny_config(data_dir, method=method, mc_passes=10))
    assert pipe.method.mc_passes == 10
    _noisy(pipe)
    method = pipe.method
    batch = next(iter(make_loader(pipe.train, pipe.tokenizer, batch_size=8)))
    method.model.train()
    one, two = (method.features(batch).phi for _ in range(2))  # features: free of the head's (small) start
    assert (one - two).abs().max() > 1e-3, "two sampled passes differ"
    predictive, point = method.predict(batch, 16)
    assert torch.allclose(predictive.sum(-1), torch.ones(8)) and not torch.allclose(predictive, point)
    assert torch.equal(point, method.predict(batch, 16)[1]), "the point prediction (posterior mean) is deterministic"

    def mean_of(n):
        method.mc_passes = n
        return method.predict_proba(batch, 16)

    reference = mean_of(400)
    errors = {n: (mean_of(n) - reference).abs().mean().item() for n in (2, 50)}
    assert errors[50] < errors[2] / 2, errors


def test_polar_blob_keeps_x_y_orthonormal_and_moves_theta_and_its_std(data_dir):
    pipe, _, trace = _train(tiny_config(data_dir, method="polar-blob", train_limit=20, steps=6), 6)
    before = adapter_state_dict(build_pipeline(tiny_config(data_dir, method="polar-blob", train_limit=20)).model)
    after = adapter_state_dict(pipe.method.model)
    for key in before:
        assert not torch.equal(before[key], after[key]), f"{key} did not move"
    for _, layer in polar_layers(pipe.method.model):
        assert max(orthogonality_error(layer).values()) < 1e-5
    assert len(trace) == 6 and all(torch.isfinite(torch.tensor(trace)))


def test_polar_blob_under_torchrun_keeps_ranks_identical_and_resumes_exactly(tmp_path, data_dir):
    """2 processes: ranks hold bit-identical tensors (σ included); a DDP checkpoint resumes to the same ones."""
    from .test_distributed import ranks, succeeded, torchrun

    options = dict(method="polar-blob", mc_passes=2, steps=4)
    succeeded(torchrun(data_dir, tmp_path / "straight", tmp_path / "B", checkpoint_every=0, **options))
    succeeded(torchrun(data_dir, tmp_path / "first", tmp_path / "A", checkpoint_every=0, **{**options, "steps": 2}))
    succeeded(torchrun(data_dir, tmp_path / "resumed", tmp_path / "A", "--resume", checkpoint_every=0, **options))
    straight, resumed = ranks(tmp_path / "straight"), ranks(tmp_path / "resumed")
    assert any(key.endswith("polar_theta_rho") for key in straight[0])
    for key in straight[0]:
        assert torch.equal(straight[0][key], straight[1][key]), key
        assert torch.equal(straight[0][key], resumed[0][key]), key
