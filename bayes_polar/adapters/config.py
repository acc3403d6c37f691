"""PolarConfig: what ``inject_polar`` adapts (targets, blocks) and how (rank, scale)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError


def check_rank(r) -> int:
    """``r`` as an int, or a ConfigError that echoes it (``Expected r > 0 but got 0``)."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise ConfigError(f"Expected r to be an int but got {r!r}")
    if r <= 0:
        raise ConfigError(f"Expected r > 0 but got {r}")
    return r


def check_alpha(alpha) -> float:
    """``alpha`` as a finite float > 0, or a ConfigError that echoes it."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"Expected alpha > 0 (finite) but got {alpha!r}")
    return float(alpha)


def check_names(value, what: str, allow_none: bool = False):
    """A regex ``str`` stays a str; an iterable of names becomes a tuple of str."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"Expected {what} to be a non-empty regex but got ''")
        return value
    try:
        names = tuple(value)
    except TypeError:
        raise ConfigError(f"Expected {what} to be a str (regex) or a list of names but got {value!r}") from None
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"Expected {what} to be a non-empty list of non-empty names but got {value!r}")
    return names


def check_layers(layers) -> tuple[int, ...] | None:
    """Block indices as a tuple of ints (negative counts from the end), or None for all blocks."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)):
        raise ConfigError(f"Expected layers to be an iterable of ints but got {layers!r}")
    try:
        indices = tuple(layers)
    except TypeError:
        raise ConfigError(f"Expected layers to be an iterable of ints or None but got {layers!r}") from None
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise ConfigError(f"Expected layers to be a non-empty iterable of ints but got {layers!r}")
    return indices


@dataclass
class PolarConfig:
    """Settings of PoLAR adapters, :math:`h = W_0 x + (\\alpha / r)\\, X \\Theta Y^\\top x`.

    Usage::

        config = PolarConfig(r=8, alpha=16, layers=(-4, -3, -2, -1))
        inject_polar(model, config=config)
    """

    r: int = field(default=8, metadata={"help": "Rank r of X (out x r), Theta (r x r) and Y (in x r)."})
    alpha: float = field(default=16.0, metadata={"help": "Scale numerator: the update is multiplied by alpha / r."})
    target_modules: str | tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "A regex (str, full match of the module name) or names matched exactly or as a '.name' "
                          "suffix; None: the model family's default (q_proj, v_proj for Llama; see "
                          "bayes_polar.adapters.architectures), resolved by inject_polar."},
    )
    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "Transformer blocks to adapt (ints, negative counts from the end); None adapts all."},
    )
    exclude_modules: str | tuple[str, ...] | None = field(
        default=None, metadata={"help": "Like target_modules; checked first, a match is never adapted."}
    )

    def __post_init__(self):
        self.r = check_rank(self.r)
        self.alpha = check_alpha(self.alpha)
        self.target_modules = check_names(self.target_modules, "target_modules", allow_none=True)
        self.exclude_modules = check_names(self.exclude_modules, "exclude_modules", allow_none=True)
        self.layers = check_layers(self.layers)

    @property
    def scaling(self) -> float:
        """The factor :math:`s = \\alpha / r` in front of :math:`X \\Theta Y^\\top`."""
        return self.alpha / self.r

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PolarConfig":
        values = json.loads(text)
        unknown = set(values) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"Unknown PolarConfig keys {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
        return cls(**values)
