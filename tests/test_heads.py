"""The heads the loop drives: isolated Pyro parameter stores, zero-shot weights, MAP penalty."""
import pyro
import pytest
import torch

from bayes_polar.data.features import Features
from bayes_polar.training.trainable_heads import PointHead, VariationalHead, zero_shot_weights
from bayes_polar.models import IsotropicPrior, WidthScaledPrior


def _data(seed, n=40, classes=3, dim=6):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, classes, dim, generator=g)
    return Features(phi, torch.ones(n, classes, dtype=torch.bool)), torch.randint(0, classes, (n,), generator=g)


def _head(prior=None):
    return VariationalHead(6, 1, prior or WidthScaledPrior(), "full", dataset_size=40, lr=0.05)


def test_two_heads_keep_their_own_parameters():
    (fa, ya), (fb, yb) = _data(0), _data(1)
    a, b = _head(), _head(IsotropicPrior(0.5))
    for _ in range(20):
        a.guide_step(fa, ya)
    snapshot = {k: v.clone() for k, v in a.state_tensors().items()}
    for _ in range(20):
        b.guide_step(fb, yb)
    assert all(torch.equal(v, a.state_tensors()[k]) for k, v in snapshot.items()), "b's training moved a"
    assert not torch.equal(a.posterior().loc, b.posterior().loc)
    assert len(pyro.get_param_store()) == 0, "nothing leaks into the global store"
    probs = a.predict_proba(fa, num_samples=32)
    torch.testing.assert_close(probs.sum(-1), torch.ones(40))


def test_head_state_round_trip():
    features, labels = _data(0)
    a = _head()
    for _ in range(10):
        a.guide_step(features, labels)
    b = _head()
    b.setup(features, labels)
    b.load_state_tensors(a.state_tensors())
    torch.testing.assert_close(b.point_proba(features), a.point_proba(features))


def test_zero_shot_weights():
    rows = torch.randn(5, 8)
    assert torch.equal(zero_shot_weights("letters", 8, rows), rows)
    options = zero_shot_weights("options", 10)
    assert options.shape == (1, 10) and options[0, 8] == 1 and options.sum() == 1
    assert zero_shot_weights("options", 10, loglik_features=False).abs().sum() == 0


def test_map_head_adds_the_prior_penalty():
    features, labels = _data(0)
    init = torch.randn(1, 6)
    mle, map_ = PointHead(init), PointHead(init, IsotropicPrior(0.1), dataset_size=40)
    penalty = -IsotropicPrior(0.1).distribution(6, 1).log_prob(init) / 40
    torch.testing.assert_close(map_.loss(features, labels), mle.loss(features, labels) + penalty)
    map_.temperature = 2.0
    torch.testing.assert_close(map_.predict_proba(features), (map_.logits(features) / 2).softmax(-1))
