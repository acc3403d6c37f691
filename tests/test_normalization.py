"""What the head sees: options centred within each question (shift invariance, a tight Jensen bound) and scaled."""
import pytest
import torch

from bayes_polar.bll.elbo import jensen_expected_loglik
from bayes_polar.bll.laplace import fit_laplace
from bayes_polar.bll.posterior import GaussianWeights
from bayes_polar.bll.predictive import predictive_proba
from bayes_polar.data.features import Features
from bayes_polar.data.normalization import FeatureScaling, centre_options, head_features
from bayes_polar.models import WidthScaledPrior
from bayes_polar.training.trainable_heads import VariationalHead


def _options(questions=48, choices=4, dim=8, shared_scale=6.0, seed=0, drop=True):
    """Options features with a large per-question component shared by all options (as hidden states have)."""
    g = torch.Generator().manual_seed(seed)
    own = 0.5 * torch.randn(questions, choices, dim, generator=g)
    phi = shared_scale * torch.randn(questions, 1, dim, generator=g) + own
    mask = torch.ones(questions, choices, dtype=torch.bool)
    mask[::3, -1] = not drop  # some questions have one option fewer
    phi = phi * mask.unsqueeze(-1)
    w = torch.randn(1, dim, generator=g)
    logits = (own * w).sum(-1).masked_fill(~mask, float("-inf"))
    labels = torch.distributions.Categorical(logits=logits).sample()
    return phi, mask, labels, w, g


def _shifted(phi, mask, g):
    """The same vector (one per question) added to every valid option of that question."""
    return (phi + 3.0 * torch.randn(phi.shape[0], 1, phi.shape[-1], generator=g)) * mask.unsqueeze(-1)


def test_centring_is_mask_aware_and_keeps_differences():
    phi, mask, *_ = _options()
    centred = centre_options(phi, mask)
    torch.testing.assert_close(centred.sum(1), torch.zeros(phi.shape[0], phi.shape[-1]), atol=1e-5, rtol=0)
    assert torch.equal(centred[~mask], torch.zeros_like(centred[~mask]))
    torch.testing.assert_close((centred[:, :1] - centred)[mask], (phi[:, :1] - phi)[mask], atol=1e-5, rtol=1e-5)
    letters = torch.randn(5, 1, 8)
    assert torch.equal(centre_options(letters, torch.ones(5, 4, dtype=torch.bool)), letters), "letters unshifted"


def test_a_shift_shared_by_the_options_leaves_elbo_predictive_and_laplace_unchanged():
    phi, mask, labels, w, g = _options()
    shifted = _shifted(phi, mask, g)
    scaling = FeatureScaling.fit(centre_options(phi, mask), mask)
    a, b = (Features(head_features(x, mask, scaling), mask) for x in (phi, shifted))
    head = VariationalHead(8, 1, WidthScaledPrior(), "full", dataset_size=len(labels), init_loc=w, init_scale=0.3)
    head.setup(a, labels)
    torch.testing.assert_close(head.loss(a, labels), head.loss(b, labels))
    raw_a, raw_b = Features(phi, mask), Features(shifted, mask)  # what the Jensen bound charged before centring
    assert abs(head.loss(raw_a, labels).item() - head.loss(raw_b, labels).item()) > 1.0
    torch.manual_seed(1)
    first = head.predict_proba(a, 256)
    torch.manual_seed(1)
    torch.testing.assert_close(first, head.predict_proba(b, 256))
    (qa, da), (qb, db) = (fit_laplace(w, f.phi, labels, mask) for f in (a, b))
    assert da == pytest.approx(db, rel=1e-6)
    torch.testing.assert_close(qa.factor, qb.factor, atol=1e-6, rtol=1e-5)
    gen = [torch.Generator().manual_seed(2) for _ in range(2)]
    torch.testing.assert_close(predictive_proba(qa, a.phi, mask, 256, gen[0]), predictive_proba(qb, b.phi, mask, 256, gen[1]))


def test_centred_jensen_bound_is_within_half_a_nat_of_monte_carlo():
    """The issue's synthetic case: the uncentred bound is ~15 nats loose, the centred one tight."""
    phi, mask, labels, w, g = _options(questions=64, shared_scale=6.0, drop=False)
    sigma = 0.3
    q = GaussianWeights(w, diag=torch.full((1, 8), sigma ** 2))
    uncentred = jensen_expected_loglik(q, phi, labels, mask).mean().item()
    centred = jensen_expected_loglik(q, centre_options(phi, mask), labels, mask).mean().item()
    total, samples, chunk = 0.0, 100_000, 10_000
    for _ in range(samples // chunk):
        W = w + sigma * torch.randn(chunk, 8, generator=g)
        logp = torch.einsum("sd,bcd->sbc", W, phi).log_softmax(-1)
        total += logp.gather(-1, labels.view(1, -1, 1).expand(chunk, -1, 1)).sum().item()
    mc = total / (samples * len(labels))
    assert uncentred < mc - 5.0, (uncentred, mc)
    assert mc - 0.5 <= centred <= mc + 0.01, (centred, mc)


def test_scaling_gives_unit_rms_and_keeps_a_head_s_logits():
    phi, mask, *_ = _options()
    phi = centre_options(phi * torch.logspace(-2, 2, 8), mask)  # dimensions of very different scales
    scaling = FeatureScaling.fit(phi, mask)
    scaled = scaling(phi)
    torch.testing.assert_close(scaled[mask].pow(2).mean(0), torch.ones(8), atol=1e-4, rtol=1e-4)
    w = torch.randn(1, 8)
    torch.testing.assert_close((scaling.weights(w) * scaled).sum(-1), (w * phi).sum(-1), atol=1e-4, rtol=1e-4)
    restored = FeatureScaling.from_tensors(scaling.state_tensors())
    assert torch.equal(restored.scale, scaling.scale) and FeatureScaling.from_tensors({}) is None
    constant = torch.zeros(4, 3, 2)
    assert FeatureScaling.fit(constant, torch.ones(4, 3, dtype=torch.bool)).scale.tolist() == [1.0, 1.0]
