"""bayes-polar: calibrated Bayesian fine-tuning of language models (PoLAR adapters + VBLL)."""
from .data.backbone import load_backbone, load_tokenizer, tiny_random_llama
from .errors import BayesPolarError, BayesPolarWarning
from .data.features import FeatureExtractor, Features
from .data.formats import encode_task, make_loader
from .data.tasks import Example, Task, load_task, task_names
from .data.user_tasks import register_task
from .export import export_run, merge_and_unload
from .predict import Predictor

__version__ = "0.1.0"

__all__ = [
    "BayesPolarError",
    "BayesPolarWarning",
    "Example",
    "FeatureExtractor",
    "Features",
    "Predictor",
    "Task",
    "encode_task",
    "export_run",
    "load_backbone",
    "load_task",
    "load_tokenizer",
    "make_loader",
    "merge_and_unload",
    "register_task",
    "task_names",
    "tiny_random_llama",
]
