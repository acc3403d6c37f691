"""A start that is not confidently wrong: the zero-shot head at a fitted temperature, or uniform; warm-up as a fraction."""
import pytest
import torch

from bayes_polar.config import FitConfig
from bayes_polar.errors import ConfigError
from bayes_polar.training.head_start import nll, tempered_zero_shot, uniform_nll


def _scores(right_score: float, wrong_score: float, flip: float, n=400, choices=4, seed=0):
    """Options whose one feature is a zero-shot score: ``right_score`` on the answer, except for a ``flip`` fraction."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(choices, (n,), generator=g)
    favoured = torch.where(torch.rand(n, generator=g) < flip, (labels + 1) % choices, labels)
    phi = wrong_score * torch.ones(n, choices, 1) + 0.1 * torch.randn(n, choices, 1, generator=g)
    phi[torch.arange(n), favoured] = right_score
    return phi, torch.ones(n, choices, dtype=torch.bool), labels


def test_confidently_wrong_zero_shot_scores_start_uniform():
    phi, mask, labels = _scores(10.0, 0.0, flip=0.9)
    w = torch.ones(1, 1)
    assert nll(w, phi, mask, labels) > 2 * uniform_nll(mask)  # what the raw zero-shot head starts from
    init, temperature = tempered_zero_shot(w, phi, mask, labels)
    assert torch.equal(init, torch.zeros_like(w)) and temperature == float("inf")
    assert nll(init, phi, mask, labels) == pytest.approx(uniform_nll(mask))


def test_informative_but_overconfident_scores_are_tempered():
    phi, mask, labels = _scores(10.0, 0.0, flip=0.3)
    w = torch.ones(1, 1)
    init, temperature = tempered_zero_shot(w, phi, mask, labels)
    assert temperature > 2.0
    torch.testing.assert_close(init, w / temperature)
    assert nll(init, phi, mask, labels) < min(nll(w, phi, mask, labels), uniform_nll(mask))


def test_warmup_is_a_fraction_of_the_steps_unless_given_in_steps():
    base = dict(model="tiny-random-llama", steps=200)
    assert FitConfig(**base).warmup_step_count == 10  # default 5 %
    assert FitConfig(**base, warmup_fraction=0.25).warmup_step_count == 50
    assert FitConfig(**base, warmup_fraction=0.25, warmup_steps=3).warmup_step_count == 3
    assert FitConfig(model="tiny-random-llama", steps=60).warmup_step_count == 3
    for bad in (dict(warmup_fraction=1.0), dict(warmup_fraction=-0.1), dict(warmup_steps=-1),
                dict(guide_init_scale=0.0)):
        with pytest.raises(ConfigError):
            FitConfig(**base, **bad)
