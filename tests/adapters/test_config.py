"""PolarConfig: defaults, validation messages that echo the value, JSON round trip."""
import pytest

from bayes_polar.adapters import PolarConfig
from bayes_polar.errors import ConfigError


def test_defaults_and_scaling():
    config = PolarConfig()
    assert (config.r, config.alpha, config.target_modules, config.layers) == (8, 16.0, None, None)  # None: family default
    assert config.scaling == 2.0


def test_lists_become_tuples_and_regex_stays_str():
    config = PolarConfig(target_modules=["q_proj"], layers=[-1, -2], exclude_modules=r".*\.0\..*")
    assert config.target_modules == ("q_proj",) and config.layers == (-1, -2)
    assert config.exclude_modules == r".*\.0\..*"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "Expected r > 0 but got 0"),
        (dict(r=-3), "Expected r > 0 but got -3"),
        (dict(r=2.5), "Expected r to be an int but got 2.5"),
        (dict(r=True), "Expected r to be an int but got True"),
        (dict(alpha=0), "Expected alpha > 0 (finite) but got 0"),
        (dict(alpha=float("nan")), "Expected alpha > 0 (finite) but got nan"),
        (dict(target_modules=[]), "non-empty list of non-empty names but got []"),
        (dict(target_modules=""), "non-empty regex but got ''"),
        (dict(layers="top4"), "Expected layers to be an iterable of ints but got 'top4'"),
        (dict(layers=[1.0]), "non-empty iterable of ints but got [1.0]"),
    ],
)
def test_invalid_values_echo_the_value(kwargs, message):
    with pytest.raises(ConfigError) as info:
        PolarConfig(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_json_round_trip():
    config = PolarConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj"], layers=[-1], exclude_modules=["x"])
    assert PolarConfig.from_json(config.to_json()) == config


def test_from_json_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="Unknown PolarConfig keys \\['rank'\\]"):
        PolarConfig.from_json('{"rank": 4}')
