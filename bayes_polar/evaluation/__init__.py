"""Stage 5, evaluation: metrics, plots, posterior inspection and the results table.

Takes predictive probabilities and labels (or a run directory); hands on numbers and figures.
``metrics`` computes accuracy, ECE, NLL and Brier and draws reliability diagrams and ELBO
traces; ``inspection`` converts posteriors to ArviZ ``InferenceData``; ``posterior_check``
compares the guide with NUTS; ``uncertainty`` turns per-sample probabilities into per-question
scores (max probability, entropy, aleatoric, mutual information, logit variance); ``table`` runs a
methods × tasks × seeds grid.
"""
from .inspection import to_inference_data
from .metrics import classification_metrics, expected_calibration_error, plot_reliability_diagrams
from .posterior_check import posterior_check
from .table import Grid, run_grid
from .uncertainty import uncertainty_scores

__all__ = [
    "Grid",
    "classification_metrics",
    "expected_calibration_error",
    "plot_reliability_diagrams",
    "posterior_check",
    "run_grid",
    "to_inference_data",
    "uncertainty_scores",
]
