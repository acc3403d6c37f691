"""Priors over the last-layer weights, one per file (see ``bayes_polar.bll.model.Prior``).

``PRIORS`` maps the names the CLI accepts to builders; a user's own file works too:
``bayes_polar.bll.registry.load_prior("path/to/my_prior.py")``.
"""
from functools import partial

from bayes_polar.bll.model import FnPrior, Prior

from .ard import ARDPrior
from .isotropic import IsotropicPrior
from .lm_head import LMHeadPrior
from .student_t import StudentTPrior
from .width_scaled import WidthScaledPrior

PRIORS = {
    "isotropic": IsotropicPrior,
    "width_scaled": WidthScaledPrior,
    "ard": ARDPrior,
    "ard_empirical": partial(ARDPrior, empirical=True),
    "student_t": StudentTPrior,
    "lm_head": LMHeadPrior,
}

__all__ = ["PRIORS", "Prior", "FnPrior", "ARDPrior", "IsotropicPrior", "LMHeadPrior", "StudentTPrior",
           "WidthScaledPrior"]
