"""Gaussian prior centred on the zero-shot LM classifier (the LM head's answer-token rows)."""
import pyro.distributions as dist
import torch

from bayes_polar.bll.model import Prior


class LMHeadPrior(Prior):
    """.. math:: w_c \\sim \\mathcal N(e_{a_c}, s I)

    where e_{a_c} is the LM head (output embedding) row of answer token a_c (`` A``, `` B``...):
    at the prior mean the head reproduces the zero-shot LM's answer logits. In the ``options``
    format the zero-shot classifier is the option log-likelihood, and the prior mean is the
    weight vector that reads it (1 on the summed log-likelihood feature).

    The mean comes from the backbone: pass ``mean`` (K, D) or let the training code call
    ``attach({"zero_shot_weights": rows})``.

    Parameters
    ----------
    variance: s > 0.
    mean: (C, D) tensor of answer-token rows, or None until attached.
    """

    def __init__(self, variance: float = 1.0, mean: torch.Tensor | None = None):
        if not variance > 0:
            raise ValueError(f"Expected variance > 0 but got {variance}")
        self.variance = float(variance)
        self.mean = mean

    def attach(self, context):
        rows = context.get("zero_shot_weights", context.get("lm_head_rows"))
        if rows is not None:
            self.mean = torch.as_tensor(rows, dtype=torch.float32)

    def weight_dist(self, in_features, num_rows):
        if self.mean is None:
            raise ValueError("LMHeadPrior has no mean: pass mean=... or attach({'zero_shot_weights': rows}) "
                             "(bayes-polar fit does this)")
        if tuple(self.mean.shape) != (num_rows, in_features):
            raise ValueError(f"LMHeadPrior mean has shape {tuple(self.mean.shape)}, the head needs "
                             f"({num_rows}, {in_features})")
        return dist.Normal(self.mean, self.variance ** 0.5)
