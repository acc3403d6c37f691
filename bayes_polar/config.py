"""Run configuration: one dataclass, validated, saved in every run directory and checkpoint.

The CLI builds its options from the fields (``--key value``, type-checked against the
default's type; ``help`` from the field metadata); a JSON config file can set them too
(``--config run.json``), command-line options win. Unknown keys raise ConfigError; every value is
checked against its field's annotation (:mod:`bayes_polar.typecheck`) before its range, and an error
from a file names the file, the key and the bad value.

From Python the list- and dict-valued options also take lists and dicts (``layers=[-2, -1]``,
``prior_args={"variance": 0.5}``; stored in their text form), ``prior`` a
:class:`~bayes_polar.bll.model.Prior` instance and ``guide`` a builder ``model -> guide``
defined in a notebook. Such objects are recorded in config.json as ``"python:<repr>"``; reloading
that run needs the same object again (``load_run(run_dir, prior=..., guide=...)``).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .data.device import DTYPES, check_device
from .typecheck import check_fields
from .data.formats import FORMATS
from .data.tasks import derived_split

METHODS = ("polar-vbll", "polar-vbll-la", "polar-mle", "lora-vbll", "lora-mle", "lora-map", "lora-mcdropout",
           "lora-ensemble", "lora-laplace", "temperature-scaling", "lora-blob", "polar-blob")
SCHEDULES = ("cosine", "linear", "constant")
ON_NAN = ("stop", "skip")
ORTHOGONALITY_TOL = {"riemannian_adam": 1e-4, "landing": 0.1}  # landing: 2 x adapters.optim.LANDING_TOLERANCE
MODES = ("alternating", "joint")
# PoLAR's default rates (README, "PoLAR learning rates"), the dev-split choice for polar-vbll of the results
# table's protocol (benchmarks/results/smollm2_table, "The protocol"). theta_lr: POLAR_LR_FACTOR x lr
# (Θ takes Adam's per-entry steps, as LoRA's A and B; 10 is the PoLAR reference's ratio). stiefel_lr: a fixed
# STIEFEL_LR, not a multiple of lr: geoopt's RiemannianAdam keeps one second moment per matrix, so a step moves
# X or Y by about stiefel_lr in Frobenius norm whatever the layer's width (tests/adapters/test_optim.py).
POLAR_LR_FACTOR = 10.0
STIEFEL_LR = 0.1
MAX_SEED = 2 ** 19  # plain runs' seeds are below it; lora-ensemble members use [2**31, 2**32) (run.member_seed)
MAX_ENSEMBLE_SIZE = 2 ** 11
MEMBER_SEED_BASE = 2 ** 31
MAX_THREADS = 1024  # torch.set_num_threads crashes the process far above any real core count


def _help(text: str, default=MISSING, **kwargs):
    if default is MISSING:
        return field(metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class FitConfig:
    """Everything needed to rerun a ``bayes-polar fit``."""

    # data and backbone
    model: str = _help("backbone: smollm2-135m (embedded), tiny-random-llama, a local folder or a hub id", "smollm2-135m")
    task: str = _help("training task (bayes-polar tasks lists them)", "arc_easy")
    data_dir: str | None = _help("local data mirror (default: $BAYES_POLAR_DATA; none: the hub)", None)
    format: str = _help("answer format: options (per-option scoring) or letters (the paper's)", "options")
    train_split: str = _help("split trained on: train, or train-fit (train without its last tenth, the "
                             "split TASK:train-heldout that hyperparameters are chosen on)", "train")
    train_limit: int | None = _help("use only the first N training questions", None)
    eval_tasks: str = _help("comma-separated task[:split] evaluated after training (default: the task's "
                            "validation split)", "")
    eval_limit: int | None = _help("evaluate on the first N questions of each split", None)
    max_length: int = _help("tokens per sequence; longer prompts lose tokens from the left", 256)
    loglik_features: bool = _help("options: append the LM's option log-likelihood (sum, mean) to the features", True)
    # method and last layer
    method: str = _help(f"one of {', '.join(METHODS)}", "polar-vbll")
    prior: Any = _help("prior name (width_scaled: isotropic N(0, 2/D), isotropic, ard, ard_empirical, "
                       "student_t, lm_head), a .py file or (Python) a Prior object", "width_scaled")
    prior_args: str = _help('JSON keyword arguments of the prior, e.g. \'{"variance": 0.5}\'', "{}")
    guide: Any = _help("guide name (full, diagonal, lowrank, auto_mvn, ...), a .py file or (Python) a builder "
                       "model -> guide", "full")
    guide_args: str = _help('JSON keyword arguments of the guide, e.g. \'{"rank": 4}\'', "{}")
    elbo: str = _help("ELBO estimator: jensen (closed form), mc or mc_meanfield (Pyro, any prior)", "jensen")
    num_particles: int = _help("Monte Carlo ELBO particles (W only; the backbone runs once)", 8)
    kl_weight: float | None = _help("weight of KL in the per-example ELBO (default 1/N)", None)
    kl_reweighting: bool = _help("lora-blob, polar-blob: BLoB's KL re-weighting within each epoch, mean 1 "
                                 "(false: constant weight)", True)
    head_init: str = _help("initial head mean: zero_shot (the LM's own scores at a temperature fitted on the "
                           "training split; uniform if they do worse than uniform) or prior (its mean)", "zero_shot")
    # adapters
    rank: int = _help("adapter rank r", 8)
    alpha: float = _help("adapter scaling numerator (scale = alpha / r)", 16.0)
    target_modules: str = _help("comma-separated module names that get adapters, or auto: the model family's "
                                "default (q_proj,v_proj; qkv_proj for Phi-3, query_key_value for GPT-NeoX)", "auto")
    layers: str = _help("comma-separated block indices with adapters (negative from the end), or 'all'", "-4,-3,-2,-1")
    adapter_optimizer: str = _help("riemannian_adam (geoopt) or landing", "riemannian_adam")
    # optimisation
    steps: int = _help("training minibatch steps", 300)
    batch_size: int = _help("questions per minibatch", 8)
    lr: float = _help("adapter learning rate: LoRA's A, B; PoLAR's Θ runs at 10 x lr, X and Y at 0.1, unless --theta-lr / --stiefel-lr", 1e-3)
    head_lr: float = _help("last-layer (guide or point head) learning rate", 1e-2)
    weight_decay: float = _help("lora-map and lora-laplace: adapter weight decay, an L2 term (wd/2)·‖A‖² on the "
                                "per-example loss (their heads get the prior); other methods use none", 1e-2)
    mode: str = _help("alternating (guide step, then adapter step) or joint (one step on both)", "alternating")
    guide_steps: int = _help("guide steps per round (alternating)", 1)
    adapter_steps: int = _help("adapter steps per round (alternating)", 1)
    head_warmup_steps: int = _help("first steps update the head only", 0)
    schedule: str = _help("learning-rate schedule: cosine, linear or constant", "cosine")
    warmup_steps: int | None = _help("linear learning-rate warm-up steps (None: warmup_fraction of the steps)", None)
    clip_norm: float | None = _help("clip the global norm of the per-example loss's gradient, separately for the "
                                    "guide and for the adapters (+ point head) (None: off)", 1.0)
    seed: int = _help("random seed, 0 <= seed < 2**19 (lora-ensemble member m uses 2**31 + seed * 2**11 + m)", 0)
    # prediction
    predictive_samples: int = _help("last-layer samples S of the posterior predictive", 256)
    mc_passes: int = _help("lora-mcdropout, lora-blob, polar-blob: stochastic passes at test time", 10)
    dropout: float = _help("lora-mcdropout: adapter dropout", 0.1)
    ensemble_size: int = _help("lora-ensemble: members M", 3)
    # execution
    prefix_cache: bool = _help("cache the hidden states entering the first adapted block (frozen blocks run once)", True)
    cache_dtype: str = _help("dtype of the prefix cache: float32 (exact) or float16", "float32")
    cache_dir: str | None = _help("folder where prefix caches persist between runs (None: memory only)", None)
    threads: int = _help("torch CPU threads", 2)
    device: str = _help("where the frozen backbone runs: auto (CUDA when available), cpu, cuda or cuda:N "
                        "(under torchrun: cuda:LOCAL_RANK); adapters follow it, the last layer stays on the CPU", "auto")
    dtype: str = _help("backbone precision: float32, bfloat16 or float16 (adapters X, Y, Θ and the last layer "
                       "stay float32; features are cast to float32)", "float32")
    gradient_checkpointing: bool = _help("recompute the adapted blocks' activations in the backward pass "
                                         "(less memory for large backbones, about a third more compute)", False)
    checkpoint_every: int = _help("steps between checkpoints (0: only at the end)", 50)
    eval_batch_size: int = _help("questions per evaluation batch", 16)
    trust_remote_code: bool = _help("let transformers run Python code shipped with a hub model (only for a model "
                                    "you trust)", False)
    # faults
    on_nan: str = _help("NaN/Inf in features, loss, gradients or parameters: stop (raise, naming the step; the "
                        "last good checkpoint is kept) or skip (undo the batch's updates; counted in metrics.json)",
                        "stop")
    max_skipped_batches: int = _help("with --on-nan skip: stop once more than this many batches were skipped", 10)
    orthogonality_tol: float | None = _help(
        "re-orthonormalise a PoLAR factor X or Y (projection onto the Stiefel manifold) when ||X^T X - I||_F "
        "exceeds this; logged in metrics.json (None: 1e-4 with riemannian_adam, 0.1 with landing)", None)
    # what the last layer sees and where it starts
    feature_standardization: bool = _help(
        "divide each feature by its root mean square on the training split (after centring the options of each "
        "question); fitted before training, saved with the head", True)
    guide_init_scale: float = _help("initial posterior standard deviation of each weight, as a fraction of the "
                                    "prior's (guide_args' init_scale, if given, is absolute)", 0.5)
    warmup_fraction: float = _help("linear learning-rate warm-up over this fraction of the steps (unless "
                                   "warmup_steps is given)", 0.05)
    logit_noise: bool = _help("variational methods: VBLL's learned Gaussian logit noise (one variance per weight "
                              "row, Wishart prior on its precision; needs --elbo jensen)", False)
    # PoLAR's own learning rates (LoRA's A, B use lr)
    stiefel_lr: float | None = _help(
        "PoLAR: learning rate of the Stiefel factors X, Y (None: STIEFEL_LR = 0.1 whatever lr, since geoopt's "
        "RiemannianAdam keeps one second moment per matrix and a step moves a factor by about this much in Frobenius "
        "norm; 10 x lr under --adapter-optimizer landing, whose AdamW moves each entry by lr)",
        None)
    theta_lr: float | None = _help("PoLAR: learning rate of Θ (None: POLAR_LR_FACTOR = 10 x lr)", None)
    landing_lambda: float = _help("--adapter-optimizer landing: λ of the landing field's pull onto the manifold", 1.0)

    def __post_init__(self):
        self._normalise()
        check_fields(self)
        self.validate()

    def _normalise(self) -> None:
        """Lists and dicts given from Python become the text form the CLI and config.json use."""
        for name in ("layers", "target_modules", "eval_tasks"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, ",".join(str(v) for v in value))
            elif not isinstance(value, str):
                raise ConfigError(f"{name} must be a comma-separated string or a list, got {type(value).__name__} "
                                  f"{value!r}")
        for name in ("prior_args", "guide_args"):
            value = getattr(self, name)
            if isinstance(value, dict):
                try:
                    setattr(self, name, json.dumps(value, sort_keys=True))
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{name} must hold JSON values (numbers, strings, lists), got {value!r}: "
                                      f"{exc}") from None
            elif value is None:
                setattr(self, name, "{}")
            elif not isinstance(value, str):
                raise ConfigError(f"{name} must be a dict or a JSON object string, got {type(value).__name__}")
        for name in ("task", "data_dir", "cache_dir", "model"):
            value = getattr(self, name)
            if isinstance(value, Path):
                setattr(self, name, str(value))

    def validate(self) -> None:
        _one_of("format", self.format, FORMATS)
        _one_of("method", self.method, METHODS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("mode", self.mode, MODES)
        _one_of("elbo", self.elbo, ("jensen", "mc", "mc_meanfield"))
        _one_of("adapter_optimizer", self.adapter_optimizer, ("riemannian_adam", "landing"))
        _one_of("head_init", self.head_init, ("zero_shot", "prior"))
        _one_of("cache_dtype", self.cache_dtype, ("float32", "float16", "bfloat16"))
        _one_of("on_nan", self.on_nan, ON_NAN)
        _one_of("dtype", self.dtype, tuple(DTYPES))
        check_device(self.device)
        if not self.train_split or derived_split(self.train_split)[1] == "heldout":
            raise ConfigError(f"train_split {self.train_split!r}: train on train or train-fit; the held-out slice "
                              "TASK:train-heldout is for choosing hyperparameters (give it in eval_tasks)")
        for name in ("steps", "batch_size", "rank", "num_particles", "guide_steps", "adapter_steps",
                     "predictive_samples", "mc_passes", "ensemble_size", "threads", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Expected {name} >= 1 but got {getattr(self, name)}")
        for name in ("head_warmup_steps", "checkpoint_every", "weight_decay", "max_skipped_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"Expected {name} >= 0 but got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"Expected warmup_steps >= 0 (or None) but got {self.warmup_steps}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"Expected 0 <= warmup_fraction < 1 but got {self.warmup_fraction}")
        for name in ("lr", "head_lr", "alpha", "guide_init_scale", "landing_lambda"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"Expected {name} > 0 but got {getattr(self, name)}")
        if self.threads > MAX_THREADS:
            raise ConfigError(f"Expected threads <= {MAX_THREADS} but got {self.threads}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"Expected 0 <= dropout < 1 but got {self.dropout}")
        if not 0 <= self.seed < MAX_SEED:
            raise ConfigError(f"Expected 0 <= seed < 2**19 but got {self.seed}")
        if self.ensemble_size > MAX_ENSEMBLE_SIZE:
            raise ConfigError(f"Expected ensemble_size <= 2**11 but got {self.ensemble_size}")
        if self.kl_weight is not None and self.kl_weight < 0:
            raise ConfigError(f"Expected kl_weight >= 0 but got {self.kl_weight}")
        for name in ("stiefel_lr", "theta_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"Expected {name} > 0 (or None) but got {getattr(self, name)}")
        if self.orthogonality_tol is not None and not self.orthogonality_tol > 0:
            raise ConfigError(f"Expected orthogonality_tol > 0 (or None) but got {self.orthogonality_tol}")
        if self.logit_noise and self.elbo != "jensen":
            raise ConfigError(f"logit_noise needs the closed-form ELBO (elbo='jensen'), got elbo={self.elbo!r}")
        if self.logit_noise and not self.method.endswith(("vbll", "vbll-la")):
            raise ConfigError(f"logit_noise is part of the variational head; method {self.method!r} has none")
        self.prior_kwargs, self.guide_kwargs  # parse now: bad JSON fails early
        self._check_objects()
        self.layer_indices, self.target_module_names
        self._check_tasks()

    def _check_objects(self) -> None:
        """``prior``: a name, a file or a Prior; ``guide``: a name, a file or a callable builder."""
        from .bll.model import Prior

        if not isinstance(self.prior, (str, Prior)):
            raise ConfigError(f"prior must be a prior name, a .py file or a bayes_polar.bll.model.Prior instance, "
                              f"got {type(self.prior).__name__} {self.prior!r}")
        if not isinstance(self.guide, str) and not callable(self.guide):
            raise ConfigError(f"guide must be a guide name, a .py file or a callable builder model -> guide, "
                              f"got {type(self.guide).__name__} {self.guide!r}")
        if isinstance(self.prior, Prior) and self.prior_kwargs:
            raise ConfigError(f"prior_args {self.prior_kwargs} apply to a prior name or file; a Prior object "
                              "is used as it is (pass its arguments to its constructor)")
        for name in ("prior", "guide"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith(PYTHON_OBJECT):
                raise ConfigError(f"{name} {value!r} was a Python object of the run that wrote this configuration; "
                                  f"pass the same object again (load_run(run_dir, {name}=...))")

    @property
    def python_objects(self) -> dict[str, str]:
        """``{field: "python:<repr>"}`` for the options that hold Python objects (prior, guide)."""
        return {name: python_reference(getattr(self, name)) for name in ("prior", "guide")
                if not isinstance(getattr(self, name), str)}

    def _check_tasks(self) -> None:
        """Task names exist; a letters-format head is only evaluated on tasks with its answer words.

        Skipped for the configuration of a saved run (:func:`saved_run`): it was checked when the run was
        written, and its tasks (a file since deleted, a name registered in another process) need not exist.
        """
        from .data.tasks import letters_transfer, task_spec
        from .data.user_tasks import user_task_spec

        if _SAVED_RUN.get():
            return

        train = None if user_task_spec(self.task) else task_spec(self.task)
        for item in self.eval_tasks.split(","):
            name = item.strip().partition(":")[0]
            if not name or user_task_spec(name):
                continue  # a user's file: answer words known once read (encode_eval checks them)
            spec = task_spec(name)
            if (self.format == "letters" and train is not None
                    and not letters_transfer(train.answer_words, spec.answer_words, spec.num_classes)):
                raise ConfigError(
                    f"eval_tasks: {name} answers with {spec.answer_words}, but a letters-format head trained on "
                    f"{self.task} has one row per answer word {train.answer_words}: letters heads only transfer "
                    "between tasks with the same answer words, or letters to questions with no more choices "
                    "(use --format options)")

    @property
    def prior_kwargs(self) -> dict:
        return _json_dict("prior_args", self.prior_args)

    @property
    def guide_kwargs(self) -> dict:
        return _json_dict("guide_args", self.guide_args)

    @property
    def layer_indices(self) -> list[int] | None:
        if self.layers.strip().lower() == "all":
            return None
        try:
            return [int(x) for x in self.layers.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"layers must be 'all' or comma-separated integers, got {self.layers!r}") from None

    @property
    def orthogonality_tolerance(self) -> float:
        """``orthogonality_tol``, or the adapter optimiser's default when it is None."""
        if self.orthogonality_tol is not None:
            return float(self.orthogonality_tol)
        return ORTHOGONALITY_TOL[self.adapter_optimizer]

    @property
    def warmup_step_count(self) -> int:
        """``warmup_steps`` if given, else round(warmup_fraction · steps)."""
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return int(round(self.warmup_fraction * self.steps))

    @property
    def adapter_learning_rates(self) -> tuple[float, float]:
        """(Stiefel factors', Θ's) learning rates of PoLAR: ``stiefel_lr`` (default ``STIEFEL_LR`` under
        RiemannianAdam; ``POLAR_LR_FACTOR × lr`` under ``landing``, whose AdamW steps every entry by lr) and
        ``theta_lr`` (default ``POLAR_LR_FACTOR × lr``)."""
        scaled = POLAR_LR_FACTOR * self.lr
        stiefel_default = STIEFEL_LR if self.adapter_optimizer == "riemannian_adam" else scaled
        stiefel = stiefel_default if self.stiefel_lr is None else self.stiefel_lr
        theta = scaled if self.theta_lr is None else self.theta_lr
        return float(stiefel), float(theta)

    @property
    def target_module_names(self) -> list[str] | None:
        """The names of ``target_modules``; None for ``auto`` (the injector takes the family's default)."""
        names = [x.strip() for x in self.target_modules.split(",") if x.strip()]
        if names == ["auto"]:
            return None
        if not names or "auto" in names:
            raise ConfigError(f"target_modules must be 'auto' or comma-separated module names, got "
                              f"{self.target_modules!r}")
        return names

    def to_dict(self) -> dict:
        """JSON-ready values; Python objects (prior, guide) as ``"python:<repr>"``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(self.python_objects)
        return values

    def save(self, path) -> None:
        from .training.checkpoint import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, values: dict, source=None) -> "FitConfig":
        """A checked config from ``values``; ``source`` (a file) starts every error message."""
        where = f"{source}: " if source is not None else ""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where}Unknown configuration keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**values)
        except ConfigError as exc:
            if not where:
                raise
            raise ConfigError(f"{where}{exc}") from None

    @classmethod
    def load(cls, path) -> "FitConfig":
        return cls.from_dict(read_json(path, "the configuration"), source=path)


PYTHON_OBJECT = "python:"
_SAVED_RUN = contextvars.ContextVar("saved_run", default=False)


@contextlib.contextmanager
def saved_run():
    """Within the block FitConfig does not look its tasks up (the configuration of a finished run)."""
    token = _SAVED_RUN.set(True)
    try:
        yield
    finally:
        _SAVED_RUN.reset(token)


def python_reference(obj) -> str:
    """How config.json records a Python object: ``python:`` + its repr (qualified name for functions)."""
    name = getattr(obj, "__qualname__", None)
    text = f"{getattr(obj, '__module__', '?')}.{name}" if name and not hasattr(obj, "keywords") else repr(obj)
    return PYTHON_OBJECT + text


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _json_dict(name: str, text: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} must be a JSON object, got {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object, got {text!r}")
    return value


def add_config_arguments(parser, cls=FitConfig, skip=()) -> None:
    """Add one ``--key`` option per dataclass field (defaults left as None: unset)."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        if kind is bool:  # "--flag" alone means true; "--flag false" turns it off
            parser.add_argument(flag, type=_parse_bool, default=None, nargs="?", const=True, metavar="{true,false}",
                                help=f"{f.metadata['help']} (default: {f.default})")
        else:
            parser.add_argument(flag, type=_optional(kind), default=None,
                                help=f"{f.metadata['help']} (default: {f.default})")


def config_from_args(args, base: dict | None = None, cls=FitConfig):
    """Merge a config file / base dict with the options given on the command line."""
    values = dict(base or {})
    for f in fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = None if given == "none" else given
    return cls.from_dict(values)


def _field_type(f):
    kind = f.type if not isinstance(f.type, str) else f.type
    text = str(kind)
    for candidate in (bool, int, float, str):
        if text.startswith(candidate.__name__):
            return candidate
    return str


def _optional(kind):
    def parse(text: str):
        if text.lower() == "none":
            return "none"
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def read_json(path, what: str) -> dict:
    """A JSON object from ``path``, or a :class:`ConfigError` naming ``what`` and the file."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Cannot read {what} {path}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what.capitalize()} {path} must be a JSON object, got {type(values).__name__}")
    return values
