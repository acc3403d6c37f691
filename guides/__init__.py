"""Variational guides for the last layer, one per file; plus Pyro's autoguides as drop-ins.

A guide file exports a *builder*, ``callable(model) -> guide`` (a class or a ``partial``).
``GUIDES`` maps the names the CLI accepts to builders; a user's own file works too:
``bayes_polar.bll.registry.load_guide("path/to/my_guide.py")``.
"""
from functools import partial

from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from bayes_polar.bll.guide import DEFAULT_INIT_SCALE, WeightGuide

from .diagonal import DiagonalGuide
from .full_covariance import FullCovarianceGuide
from .low_rank import LowRankGuide

GUIDES = {
    "full": FullCovarianceGuide,
    "diagonal": DiagonalGuide,
    "lowrank": LowRankGuide,
    "auto_mvn": partial(AutoMultivariateNormal, init_scale=DEFAULT_INIT_SCALE),
    "auto_lowrank": partial(AutoLowRankMultivariateNormal, init_scale=DEFAULT_INIT_SCALE),
    "auto_diagonal": partial(AutoDiagonalNormal, init_scale=DEFAULT_INIT_SCALE),
    "auto_normal": partial(AutoNormal, init_scale=DEFAULT_INIT_SCALE),
}

__all__ = ["GUIDES", "WeightGuide", "DiagonalGuide", "FullCovarianceGuide", "LowRankGuide"]
