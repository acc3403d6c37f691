"""Stage 1, data: questions → token ids → features.

Takes a task (built-in benchmark rows, local files or hub ids) and a frozen causal-LM backbone;
hands on :class:`Features` φ (final hidden state, and in the ``options`` format the option
log-likelihoods) for the Bayesian last layer. ``tasks`` reads and validates rows, ``formats``
turns them into prompts and batches, ``features`` runs the backbone, ``prefix_cache`` runs the
frozen lower blocks once, ``backbone``/``hub`` load models locally or from the hub.
"""
from .backbone import cache_dir, load_backbone, load_tokenizer, tiny_random_llama
from .features import FeatureExtractor, Features
from .formats import FORMATS, Batch, EncodedTask, encode_task, make_loader
from .tasks import Example, Task, load_task, task_names

__all__ = [
    "FORMATS",
    "Batch",
    "EncodedTask",
    "Example",
    "FeatureExtractor",
    "Features",
    "Task",
    "cache_dir",
    "encode_task",
    "load_backbone",
    "load_task",
    "load_tokenizer",
    "make_loader",
    "task_names",
    "tiny_random_llama",
]
