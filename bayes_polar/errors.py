"""Library errors and warnings.

Every error subclasses :class:`BayesPolarError` *and* the builtin it refines, so
``except ValueError`` keeps working for callers that do not know this library.
"""
from __future__ import annotations


class BayesPolarError(Exception):
    """Base class of every error raised on purpose by bayes-polar."""


class BayesPolarWarning(UserWarning):
    """Base class of every warning issued by bayes-polar."""


class DataFormatError(BayesPolarError, ValueError):
    """A data file or row does not have the expected form (names file, line and field)."""


class UnknownTaskError(BayesPolarError, KeyError):
    """A task name that is not in the task registry."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class OfflineError(BayesPolarError, OSError):
    """A model or dataset that is neither local nor reachable on a hub."""


class NoTargetModulesError(BayesPolarError, ValueError):
    """No module of the model matched the adapter's ``target_modules``."""


class ShapeMismatchError(BayesPolarError, ValueError):
    """Features, labels or a head whose shapes do not fit together."""


class NumericalError(BayesPolarError, FloatingPointError):
    """NaN or Inf in features, loss or gradients."""


class CheckpointError(BayesPolarError, OSError):
    """A checkpoint that is missing, truncated or corrupted."""


class ConfigError(BayesPolarError, ValueError):
    """An invalid configuration value or an unknown configuration key."""


class UnsupportedArchitectureError(ConfigError):
    """A model of a family bayes-polar has no defaults for, or whose blocks it cannot find (lists the supported ones)."""


class UnsupportedModuleError(BayesPolarError, TypeError):
    """A matched module that an adapter cannot wrap (names the module and its type)."""


class OffManifoldError(BayesPolarError, AssertionError):
    """A Stiefel factor whose Gram matrix is farther from the identity than allowed."""


class AdapterMismatchError(BayesPolarError, ValueError):
    """Saved adapters whose tensor names or shapes differ from the model's adapters."""


class MissingFileError(BayesPolarError, FileNotFoundError):
    """A file or folder the user named (data, model, prior or guide file) that does not exist."""


class UserModuleError(BayesPolarError, ImportError):
    """A user's prior or guide file that fails to import (names the file, the line and the error)."""


class InvalidValueError(BayesPolarError, ValueError):
    """An argument of the right type and shape whose value is not allowed (echoes the value)."""


class InvalidTypeError(BayesPolarError, TypeError):
    """An argument of the wrong type or dtype (says which one was expected)."""


class RunDirBusyError(BayesPolarError, OSError):
    """A run directory another live bayes-polar process holds (names that process's PID)."""


class ArtifactError(BayesPolarError, OSError):
    """A final artifact or cache file that is missing or does not match its sha256 manifest (names the file)."""
