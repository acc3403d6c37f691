"""Features φ for the Bayesian last layer: one backbone pass per batch.

For a batch of S left-padded sequences the trunk returns final hidden states (after the final
norm) of shape (S, L, d). ``letters``: φ = h[:, -1], shaped (B, 1, d). ``options``:
φ_c = [h_c[-1], ℓ_sum, ℓ_mean], shaped (B, C, d + 2), where

.. math:: \\ell_{sum} = \\sum_{j \\in cont} \\log p_{LM}(t_j \\mid t_{<j}), \\qquad
          \\ell_{mean} = \\ell_{sum} / |cont|

are the LM's own log-likelihood of the option text (on by default). The head sees them through
:func:`~bayes_polar.data.normalization.head_features` (options centred within each question, then
scaled per dimension by the run's :class:`~bayes_polar.data.normalization.FeatureScaling`): every
consumer of the extractor (training, prediction, Laplace, inspection, posterior check) gets the same.

The backbone may sit on any device and dtype: batches stay on the CPU, the trunk moves their
token ids to the backbone, and φ comes back as float32 on the CPU, where the (small) last layer
lives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import NumericalError, UnsupportedArchitectureError
from .formats import Batch, check_format
from .normalization import FeatureScaling, head_features


def model_device(model) -> torch.device:
    """Where the backbone's weights are (its input embeddings)."""
    return model.get_input_embeddings().weight.device


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class FullTrunk:
    """Runs the whole decoder: ``(input_ids, attention_mask) -> final hidden states (S, L, d)``."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch: Batch) -> torch.Tensor:
        decoder, device = self.model.get_decoder(), model_device(self.model)
        mask = batch.attention_mask.to(device)
        out = decoder(input_ids=batch.input_ids.to(device), attention_mask=mask,
                      position_ids=position_ids_from_mask(mask), use_cache=False)
        return out.last_hidden_state


@dataclass
class Features:
    """φ (B, C or 1, D) in float32 and which of the C choices exist (B, C)."""

    phi: torch.Tensor
    mask: torch.Tensor

    def detach(self) -> "Features":
        return Features(self.phi.detach(), self.mask)


def check_finite_features(features: Features, batch: Batch) -> Features:
    """``features``, or :class:`NumericalError` naming the questions whose φ holds NaN/Inf."""
    finite = torch.isfinite(features.phi)
    if not finite.all():
        rows = (~finite).flatten(1).any(1).nonzero().flatten()
        questions = batch.indices[rows].tolist()
        raise NumericalError(f"features contain NaN or Inf ({int((~finite).sum())} entries, questions "
                             f"{questions[:5]}{' ...' if len(questions) > 5 else ''} of the split)")
    return features


class FeatureExtractor:
    """Turns a :class:`~bayes_polar.data.formats.Batch` into :class:`Features` for one answer format.

    Parameters
    ----------
    model: the causal LM (its adapters, if any, are part of the pass).
    format: ``letters`` or ``options``.
    loglik_features: options only; append the option log-likelihood (sum, mean) to φ.
    trunk: what produces the final hidden states; defaults to the full decoder.
    scaling: the run's per-dimension feature scaling (None: unscaled; set once fitted).
    """

    def __init__(self, model, format: str = "options", loglik_features: bool = True, trunk=None,
                 scaling: FeatureScaling | None = None):
        self.model = model
        self.format = check_format(format)
        self.loglik_features = loglik_features and format == "options"
        self.trunk = trunk if trunk is not None else FullTrunk(model)
        self.scaling = scaling

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size + (2 if self.loglik_features else 0)

    def __call__(self, batch: Batch) -> Features:
        """The head's input: :meth:`raw` features centred (options) and scaled."""
        raw = self.raw(batch)
        return Features(head_features(raw.phi, raw.mask, self.scaling), raw.mask)

    def raw(self, batch: Batch) -> Features:
        """Features as the backbone gives them: neither centred nor scaled."""
        hidden = self.trunk(batch)  # (S, L, d)
        last = hidden[:, -1].float()  # (S, d)
        if self.format == "letters":
            return Features(last.cpu().unsqueeze(1), batch.choice_mask)
        if self.loglik_features:
            last = torch.cat([last, option_loglik(self.model, hidden, batch)], dim=-1)
        last = last.cpu()  # (S, D): the head lives on the CPU
        num_questions, num_classes = batch.choice_mask.shape
        phi = last.new_zeros(num_questions * num_classes, last.shape[-1])
        phi = phi.index_copy(0, batch.slots, last).view(num_questions, num_classes, -1)
        return Features(phi, batch.choice_mask)


def option_loglik(model, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(S, 2): sum and mean log-likelihood of each sequence's continuation tokens.

    Only the scored positions go through the LM head, as one (T, d) matrix (T = the batch's
    continuation tokens): the head's vocabulary-wide product is the costliest step of a small
    model's training step, so no padded window is computed.
    """
    num_sequences, width = batch.input_ids.shape
    input_ids = batch.input_ids.to(hidden.device)
    lengths = batch.continuation_lengths.to(hidden.device).clamp(max=width - 1)  # (S,)
    scored = torch.arange(width, device=hidden.device) >= width - lengths.unsqueeze(1)  # (S, L): the last n tokens
    rows, cols = scored.nonzero(as_tuple=True)  # (T,) each; the state at cols - 1 predicts token cols
    logits = lm_logits(model, hidden[rows, cols - 1])  # (T, V)
    token_logp = -F.cross_entropy(logits, input_ids[rows, cols], reduction="none")  # (T,)
    total = token_logp.new_zeros(num_sequences).index_add(0, rows, token_logp)
    mean = total / lengths.clamp(min=1)
    return torch.stack([total, mean], dim=-1)


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    r"""The LM's next-token logits (float32) from final hidden states, as its own forward computes them.

    The LM head, then Gemma 2/3's final soft-capping where the config sets one,
    :math:`z \leftarrow c \tanh(z / c)` with ``c = config.final_logit_softcapping``.
    """
    return final_softcap(model, model.get_output_embeddings()(hidden).float())


def final_softcap(model, logits: torch.Tensor) -> torch.Tensor:
    r""":math:`c \tanh(z / c)` with ``c = config.final_logit_softcapping`` (Gemma 2/3); ``logits`` where unset."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def answer_head_rows(model, answer_ids: list[int]) -> torch.Tensor:
    """(C, d) rows of the LM head for the answer tokens: the zero-shot letters classifier.

    Raises :class:`~bayes_polar.errors.UnsupportedArchitectureError` for an LM head with a bias (Phi-2):
    the bias-free head z = Wφ could not reproduce the LM's answer logits.
    """
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}'s LM head has a bias, which the letters-format head (z = W phi, no bias) cannot "
            "carry: use format='options' (--format options) for this model")
    weight = head.weight
    return weight[torch.tensor(answer_ids, device=weight.device)].detach().float().cpu().clone()


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, loader, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the extractor over a loader without gradients: ``(phi, mask, labels)`` for all of it."""
    from tqdm.auto import tqdm

    phis, masks, labels = [], [], []
    for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
        features = extractor(batch)
        phis.append(features.phi)
        masks.append(features.mask)
        labels.append(batch.labels)
    return torch.cat(phis), torch.cat(masks), torch.cat(labels)
