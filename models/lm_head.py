"""Gaussian prior centred on the LM head's answer-token rows: the zero-shot model as prior mean."""
import pyro.distributions as dist
import torch

from bayes_polar.head import Prior


class LMHeadPrior(Prior):
    """.. math:: w_c \\sim \\mathcal N(e_{a_c}, s I)

    where e_{a_c} is the LM head (output embedding) row of answer token a_c (`` A``, `` B``...):
    at the prior mean the head reproduces the zero-shot LM's answer logits. ``letters`` only.

    The mean comes from the backbone: pass ``mean`` (C, D) or let the training code call
    ``attach({"lm_head_rows": rows})``.

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
        if "lm_head_rows" in context:
            self.mean = torch.as_tensor(context["lm_head_rows"], dtype=torch.float32)

    def weight_dist(self, in_features, num_rows):
        if self.mean is None:
            raise ValueError("LMHeadPrior has no mean: pass mean=... or attach({'lm_head_rows': rows}) "
                             "(the letters format does this; options has no answer-token rows)")
        if tuple(self.mean.shape) != (num_rows, in_features):
            raise ValueError(f"LMHeadPrior mean has shape {tuple(self.mean.shape)}, the head needs "
                             f"({num_rows}, {in_features})")
        return dist.Normal(self.mean, self.variance ** 0.5)
