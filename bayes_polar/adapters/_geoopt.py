"""geoopt, imported without the DeprecationWarning that its ``@torch.jit.script`` decorators raise.

geoopt 0.5.1 scripts a few helpers at import time and torch >= 2.10 deprecates ``torch.jit.script``;
the warning is about geoopt's internals, not about anything a caller can change. Import geoopt
from here so that the project's ``filterwarnings = error`` stays strict everywhere else.
"""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
    import geoopt  # noqa: E402

__all__ = ["geoopt"]
