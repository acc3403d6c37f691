"""Accuracy and calibration metrics of predictive probabilities, and their plots.

Every metric is a pure function of ``probs`` (N, C), rows summing to 1 (a class that does not
exist for a question has probability 0), and ``labels`` (N,), integers in [0, C). Metrics are
computed in float64 and returned as plain Python numbers; ECE is in percent, accuracy a fraction.

Binning convention (identical to ``torchmetrics.functional.classification.
multiclass_calibration_error(..., norm="l1")``, so our ECE matches numbers published with it):
bin b of M holds the confidences c = max_k p_k with b/M <= c < (b+1)/M (left-closed), bin
membership being decided in float32; a confidence of exactly 1 falls in an extra, zero-width
"saturated" cell {1}. Ties in the max go to the lowest class index.

Usage::

    metrics = classification_metrics(probs, labels)  # acc, ece, ace, mce, cw_ece, nll, brier, n
    reliability_diagram(probs, labels, "runs/x/reliability.png")

Plots draw on :class:`matplotlib.figure.Figure` objects with the Agg canvas: headless, never
registered with pyplot (so nothing to leak or close) and the global backend is left alone.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..errors import InvalidTypeError, InvalidValueError, NumericalError, ShapeMismatchError

ROW_SUM_ATOL = 1e-4  # float32/float64 inputs
_HALF_ROW_SUM_ATOL = 1e-2  # float16/bfloat16 inputs
NLL_EPS = 1e-12

__all__ = [
    "CalibrationBins",
    "accuracy",
    "adaptive_calibration_error",
    "brier_score",
    "calibration_bins",
    "check_probs",
    "classification_metrics",
    "classwise_calibration_error",
    "confidence_histogram",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "plot_elbo_trace",
    "plot_reliability_diagrams",
    "reliability_diagram",
]


# ----------------------------------------------------------------------------- validation
def check_probs(probs) -> Tensor:
    """Validate predictive probabilities and return them as a detached float64 tensor (N, C).

    Raises :class:`ShapeMismatchError` (not 2-D, or empty), :class:`NumericalError` (NaN/Inf),
    :class:`InvalidTypeError` (integer dtype; a ``TypeError``) or :class:`InvalidValueError`
    (negative entries, or a row whose sum is not 1 within ``ROW_SUM_ATOL``; the message names
    the worst row; a ``ValueError``). Every error here is a :class:`BayesPolarError`.
    """
    probs = torch.as_tensor(probs)
    if probs.ndim != 2:
        raise ShapeMismatchError(f"probs must have shape (N, C) but got shape {tuple(probs.shape)}")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ShapeMismatchError(f"empty input: probs has shape {tuple(probs.shape)}; need N >= 1 and C >= 1")
    if not probs.is_floating_point():
        raise InvalidTypeError(f"probs must be a floating tensor but got dtype {probs.dtype}")
    atol = _HALF_ROW_SUM_ATOL if probs.dtype in (torch.float16, torch.bfloat16) else ROW_SUM_ATOL
    p = probs.detach().to(torch.float64)
    bad_rows = (~torch.isfinite(p)).any(dim=1)
    if bad_rows.any():
        i = int(bad_rows.nonzero()[0])
        raise NumericalError(f"probs has NaN/Inf in {int(bad_rows.sum())} row(s); "
                             f"first is row {i}: {p[i].tolist()}")
    if (p < 0).any():
        i = int((p < 0).any(dim=1).nonzero()[0])
        raise InvalidValueError(f"probs must be >= 0 but row {i} is {p[i].tolist()} (pass probabilities, not logits)")
    deviation = (p.sum(dim=1) - 1).abs()
    worst = int(deviation.argmax())
    if deviation[worst] > atol:
        raise InvalidValueError(
            f"rows of probs must sum to 1 (atol {atol:g}); worst is row {worst}, summing to "
            f"{float(p[worst].sum()):.6g}. Pass probabilities, not logits (apply softmax first)"
        )
    return p


def _check(probs, labels) -> tuple[Tensor, Tensor]:
    """``(probs float64 (N, C), labels long (N,))`` after validating both."""
    p = check_probs(probs)
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ShapeMismatchError(
            f"probs has shape {tuple(p.shape)} and labels has shape {tuple(y.shape)}; "
            f"expected labels of shape ({p.shape[0]},)"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InvalidTypeError(f"labels must be an integer tensor but got dtype {y.dtype}")
    y = y.detach().to(device=p.device, dtype=torch.long)
    outside = (y < 0) | (y >= p.shape[1])
    if outside.any():
        i = int(outside.nonzero()[0])
        raise InvalidValueError(f"labels must lie in [0, {p.shape[1]}) but labels[{i}] = {int(y[i])}")
    return p, y


def _check_n_bins(n_bins) -> int:
    try:
        value = operator.index(n_bins)
    except TypeError:
        value = None
    if value is None or isinstance(n_bins, bool) or value < 1:
        raise InvalidValueError(f"Expected an integer n_bins >= 1 but got {n_bins!r}")
    return value


# ----------------------------------------------------------------------------- metrics
def _accuracy(p: Tensor, y: Tensor) -> float:
    return float((p.argmax(dim=1) == y).double().mean())


def _nll(p: Tensor, y: Tensor, eps: float) -> float:
    p_true = p.gather(1, y[:, None]).squeeze(1).clamp(min=eps, max=1.0)  # (N,)
    return float(-p_true.log().mean())


def _brier(p: Tensor, y: Tensor) -> float:
    one_hot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)  # (N, C)
    return float(((p - one_hot) ** 2).sum(dim=1).mean())


def accuracy(probs, labels) -> float:
    r"""Fraction of examples whose most probable class is the label.

    .. math:: \mathrm{acc} = \frac{1}{N}\sum_i \mathbb{1}[\arg\max_c p_{ic} = y_i] \in [0, 1]
    """
    return _accuracy(*_check(probs, labels))


def negative_log_likelihood(probs, labels, eps: float = NLL_EPS) -> float:
    r"""Mean negative log-likelihood of the (already averaged) predictive probabilities.

    .. math:: \mathrm{NLL} = -\frac{1}{N}\sum_i \log \operatorname{clamp}(p_{i y_i}, \epsilon, 1)

    The clamp keeps a zero probability on the label finite (at most :math:`-\log\epsilon`).
    """
    if not 0 < eps < 1:
        raise InvalidValueError(f"Expected 0 < eps < 1 but got {eps!r}")
    return _nll(*_check(probs, labels), eps)


def brier_score(probs, labels) -> float:
    r"""Multiclass Brier score, in [0, 2].

    .. math:: \mathrm{BS} = \frac{1}{N}\sum_i \sum_c (p_{ic} - \mathbb{1}[y_i = c])^2
    """
    return _brier(*_check(probs, labels))


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin statistics of the max probability; entry ``n_bins`` is the saturated cell {1}.

    ``edges`` (M+1,) bin edges; ``count``, ``acc``, ``conf`` (M+1,) float64 (``acc`` and ``conf``
    are NaN where ``count`` is 0); ``n`` the number of examples.
    """

    edges: Tensor
    count: Tensor
    acc: Tensor
    conf: Tensor
    n: int

    @property
    def n_bins(self) -> int:
        return self.edges.numel() - 1

    def ece(self) -> float:
        """L1 expected calibration error of these bins, in percent."""
        gap = (self.acc - self.conf).abs().nan_to_num(0.0)
        return float(100 * (self.count / self.n * gap).sum())

    def mce(self) -> float:
        """Maximum calibration error: the largest |acc − conf| over non-empty bins, in percent."""
        gap = (self.acc - self.conf).abs()[self.count > 0]
        return float(100 * gap.max())


def _bins(p: Tensor, y: Tensor, n_bins: int) -> CalibrationBins:
    conf, pred = p.max(dim=1)  # (N,), (N,)
    correct = (pred == y).to(p.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=p.device)
    idx = torch.bucketize(conf.float(), edges, right=True) - 1  # (N,) in [0, M]; M: conf == 1
    zeros = torch.zeros(n_bins + 1, dtype=p.dtype, device=p.device)
    count = zeros.index_add(0, idx, torch.ones_like(conf))
    acc = zeros.index_add(0, idx, correct) / count  # NaN where empty
    mean_conf = zeros.index_add(0, idx, conf) / count
    return CalibrationBins(edges.double().cpu(), count.cpu(), acc.cpu(), mean_conf.cpu(), p.shape[0])


def calibration_bins(probs, labels, n_bins: int = 15) -> CalibrationBins:
    """Bin the examples by confidence (see the module docstring for the edge convention)."""
    return _bins(*_check(probs, labels), _check_n_bins(n_bins))


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    r"""L1 expected calibration error on the max probability, equal-width bins, in percent.

    .. math:: \mathrm{ECE} = 100 \sum_{b} \frac{|B_b|}{N}\,
              \bigl|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\bigr|

    where :math:`B_b` are the examples whose confidence :math:`\max_c p_{ic}` falls in bin b
    (left-closed bins plus a saturated cell {1}, as torchmetrics), acc the fraction correct and
    conf the mean confidence in the bin. In [0, 100].

    Parameters
    ----------
    probs : Tensor (N, C)
        Predictive probabilities; rows sum to 1.
    labels : Tensor (N,)
        Integer labels in [0, C).
    n_bins : int
        Number of equal-width bins M >= 1 (15 in the paper's protocol).

    Returns
    -------
    float
        ECE in percent; agrees with ``100 * multiclass_calibration_error(probs, labels, C,
        n_bins, norm="l1")`` of torchmetrics up to its float32 rounding (~1e-4).
    """
    return calibration_bins(probs, labels, n_bins).ece()


def maximum_calibration_error(probs, labels, n_bins: int = 15) -> float:
    r"""Maximum calibration error on the max probability, equal-width bins (as the ECE), in percent.

    .. math:: \mathrm{MCE} = 100 \max_{b: |B_b| > 0} \bigl|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\bigr|

    Equals ``100 * multiclass_calibration_error(..., norm="max")`` of torchmetrics.
    """
    return calibration_bins(probs, labels, n_bins).mce()


def _adaptive(p: Tensor, y: Tensor, n_bins: int) -> float:
    conf, pred = p.max(dim=1)
    correct = (pred == y).to(p.dtype)
    by_correct = correct.argsort(stable=True)  # ties in confidence: errors first, so equal pairs are exchangeable
    order = by_correct[conf[by_correct].argsort(stable=True)]
    total = 0.0
    for idx in torch.tensor_split(order, min(n_bins, len(order))):  # equal mass: sizes differ by at most 1
        total += len(idx) * float((correct[idx].mean() - conf[idx].mean()).abs())
    return 100 * total / len(order)


def adaptive_calibration_error(probs, labels, n_bins: int = 15) -> float:
    r"""Adaptive (equal-mass) ECE on the max probability, in percent (Nixon et al., 2019).

    .. math:: \mathrm{ACE} = 100 \sum_b \frac{|B_b|}{N} \bigl|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\bigr|

    with bins :math:`B_b` holding consecutive runs of the examples sorted by confidence, of sizes
    ⌊N/M⌋ or ⌈N/M⌉ (equal confidences: errors first, so the result does not depend on the order
    of the examples); M = min(n_bins, N).
    """
    return _adaptive(*_check(probs, labels), _check_n_bins(n_bins))


def _classwise(p: Tensor, y: Tensor, n_bins: int) -> float:
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=p.device)
    one_hot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    total = 0.0
    for c in range(p.shape[1]):
        idx = torch.bucketize(p[:, c].float(), edges, right=True) - 1  # the ECE's bins, saturated cell at 1
        zeros = torch.zeros(n_bins + 1, dtype=p.dtype, device=p.device)
        gap = (zeros.index_add(0, idx, one_hot[:, c]) - zeros.index_add(0, idx, p[:, c])).abs()  # |B|·|freq − conf|
        total += float(gap.sum()) / p.shape[0]
    return 100 * total / p.shape[1]


def classwise_calibration_error(probs, labels, n_bins: int = 15) -> float:
    r"""Classwise ECE (Kull et al., 2019): the ECE of every class's probability, averaged over classes, in percent.

    .. math:: \mathrm{cwECE} = \frac{100}{C} \sum_c \sum_b \frac{|B_{cb}|}{N}
              \Bigl|\frac{1}{|B_{cb}|}\sum_{i \in B_{cb}} \mathbb 1[y_i = c] - \frac{1}{|B_{cb}|}\sum_{i \in B_{cb}} p_{ic}\Bigr|

    :math:`B_{cb}`: the examples whose :math:`p_{ic}` falls in equal-width bin b (the ECE's bins).
    Missing choices (p = 0, never the label) fall in bin 0 with no gap.
    """
    return _classwise(*_check(probs, labels), _check_n_bins(n_bins))


def classification_metrics(probs, labels, n_bins: int = 15) -> dict:
    """``{"acc", "ece", "ace", "mce", "cw_ece", "nll", "brier", "n"}`` as plain Python numbers (JSON-ready).

    ``acc`` is a fraction; ``ece`` (equal-width), ``ace`` (equal-mass), ``mce`` (maximum) and
    ``cw_ece`` (classwise) in percent, with ``n_bins`` bins; ``nll`` in nats.
    """
    p, y = _check(probs, labels)
    n_bins = _check_n_bins(n_bins)
    bins = _bins(p, y, n_bins)
    return {
        "acc": _accuracy(p, y),
        "ece": bins.ece(),
        "ace": _adaptive(p, y, n_bins),
        "mce": bins.mce(),
        "cw_ece": _classwise(p, y, n_bins),
        "nll": _nll(p, y, NLL_EPS),
        "brier": _brier(p, y),
        "n": int(p.shape[0]),
    }


# ----------------------------------------------------------------------------- plots
def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def _draw_reliability(ax, bins: CalibrationBins, title: str | None) -> None:
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    m, width = bins.n_bins, 1.0 / bins.n_bins
    left = bins.edges[:-1].numpy()
    acc, conf, count = (t[:m].nan_to_num(0.0).numpy() for t in (bins.acc, bins.conf, bins.count))
    ax.bar(left, acc, width, align="edge", color="tab:blue", edgecolor="black", lw=0.5,
           label=f"accuracy (ECE {bins.ece():.1f}%)")
    ax.bar(left, conf - acc, width, bottom=acc, align="edge", color="tab:red", alpha=0.3,
           edgecolor="tab:red", lw=0.5, hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    saturated = int(bins.count[m])
    if saturated:
        ax.plot([1.0], [float(bins.acc[m])], "D", color="tab:orange", clip_on=False,
                label=f"confidence = 1 (n={saturated})")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize="small")
    ax.tick_params(labelbottom=False)
    hist = make_axes_locatable(ax).append_axes("bottom", size="30%", pad=0.1, sharex=ax)
    hist.bar(left, count, width, align="edge", color="gray", edgecolor="black", lw=0.5)
    if saturated:
        hist.vlines([1.0], 0, saturated, color="tab:orange", lw=3)
    hist.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="count")


def reliability_diagram(probs, labels, path, n_bins: int = 15, title: str | None = None, ax=None):
    """Save a reliability diagram (accuracy per confidence bin, diagonal, counts below) as PNG.

    With ``ax`` the diagram is drawn into that axes (a count panel is appended below it) and
    ``ax.figure`` is saved to ``path`` unless ``path`` is None; the caller keeps its figure.
    Returns ``path`` as a :class:`~pathlib.Path` (None when ``path`` is None).
    """
    bins = calibration_bins(probs, labels, n_bins)
    fig = _figure((4.5, 5.5)) if ax is None else ax.figure
    _draw_reliability(ax if ax is not None else fig.add_subplot(), bins, title)
    return None if path is None else _save(fig, path)


def plot_reliability_diagrams(curves: Mapping[str, tuple], path, n_bins: int = 15,
                              ncols: int = 3, title: str | None = None) -> Path:
    """Save one reliability diagram per method, on a grid of one figure, as PNG.

    ``curves`` maps a method name to its ``(probs, labels)``; each panel's legend gives its ECE.
    """
    if not curves:
        raise InvalidValueError("curves is empty: pass {name: (probs, labels)}")
    if ncols < 1:
        raise InvalidValueError(f"Expected ncols >= 1 but got {ncols!r}")
    all_bins = {name: calibration_bins(p, y, n_bins) for name, (p, y) in curves.items()}
    ncols = min(ncols, len(all_bins))
    nrows = math.ceil(len(all_bins) / ncols)
    height = 5.5 * nrows
    fig = _figure((4.5 * ncols, height))
    grid = {"hspace": 0.3, "wspace": 0.3, "top": 1 - (1.0 if title else 0.5) / height, "bottom": 0.6 / height}
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=grid).ravel()
    for ax, (name, bins) in zip(axes, all_bins.items()):
        _draw_reliability(ax, bins, name)
    for ax in axes[len(all_bins):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_elbo_trace(values, path, xlabel: str = "step", ylabel: str = "ELBO per example",
                    title: str | None = None) -> Path:
    """Save a line plot of an ELBO (or loss) trace as PNG.

    ``values`` is a sequence of numbers, or a mapping from a name to such a sequence (one line
    each, e.g. one per seed). Non-finite values are left as gaps.
    """
    traces = dict(values) if isinstance(values, Mapping) else {None: values}
    traces = {name: [float(v) for v in trace] for name, trace in traces.items()}
    if not traces or any(len(t) == 0 for t in traces.values()):
        raise InvalidValueError("plot_elbo_trace needs at least one non-empty trace")
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    for name, trace in traces.items():
        ax.plot(range(len(trace)), trace, lw=1, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if None not in traces:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def confidence_histogram(groups: Mapping[str, object], path, n_bins: int = 20,
                         title: str | None = None) -> Path:
    """Save overlaid histograms of the max probability per group (e.g. in- vs out-of-distribution).

    ``groups`` maps a name to its probs (N, C); bars show the fraction of the group's examples,
    so groups of different sizes compare; the legend gives each group's size and mean confidence.
    """
    if not groups:
        raise InvalidValueError("groups is empty: pass {name: probs}")
    n_bins = _check_n_bins(n_bins)
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    edges = torch.linspace(0, 1, n_bins + 1).numpy()
    for name, probs in groups.items():
        conf = check_probs(probs).max(dim=1).values.cpu().numpy()
        ax.hist(conf, bins=edges, weights=[1.0 / len(conf)] * len(conf), histtype="step", lw=1.5,
                label=f"{name} (n={len(conf)}, mean {conf.mean():.2f})")
    ax.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="fraction of examples", title=title)
    ax.legend(fontsize="small")
    return _save(fig, path)
