"""Stage 4, training: one loop that fits every method by alternating guide and adapter steps.

Takes a :class:`~bayes_polar.config.FitConfig`, a backbone with adapters and the encoded
training split; hands on fitted adapters and a fitted head. ``methods`` composes a method from
adapters × trainable head × steps; ``trainable_heads`` holds the variational and point heads the
loop drives; ``steps`` the guide, adapter and joint steps; ``loop`` the loop itself; ``faults``,
``checkpoint``, ``distributed`` and ``rng`` make it safe to stop, resume and run on many processes.
"""
from .checkpoint import atomic_write_json, atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import fit, set_threads
from .methods import Ensemble, Method, build_method, is_variational
from .steps import AdapterStep, GuideStep, JointStep
from .trainable_heads import PointHead, VariationalHead

__all__ = [
    "AdapterStep",
    "Ensemble",
    "GuideStep",
    "JointStep",
    "Method",
    "PointHead",
    "VariationalHead",
    "atomic_write_json",
    "atomic_write_text",
    "build_method",
    "fit",
    "is_variational",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "set_threads",
]
