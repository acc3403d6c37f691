"""Priors and guides from user files: every way a file can be wrong names the file (and the line)."""
import pytest

from bayes_polar.errors import BayesPolarError, ConfigError, MissingFileError, UserModuleError
from bayes_polar.bll.model import BayesianLastLayer
from bayes_polar.bll.registry import load_guide, load_prior, make_guide


@pytest.mark.parametrize("source,match", [
    ("import torch\n\ndef f(:\n    pass\n", r"bad.py:line 3 fails to import: SyntaxError: invalid syntax"),
    ("import no_such_module_for_bayes_polar\n",
     r"bad.py:line 1 fails to import: ModuleNotFoundError: No module named 'no_such_module_for_bayes_polar'"),
    ("x = 1\n\n\nraise RuntimeError('broken\\nprior')\n", r"bad.py:line 4 fails to import: RuntimeError: broken$"),
])
@pytest.mark.parametrize("load", [load_prior, load_guide])
def test_a_file_that_fails_to_import_is_named_with_its_line(tmp_path, source, match, load):
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(UserModuleError, match=match) as info:
        load(str(path))
    assert isinstance(info.value, ImportError) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("load,what", [(load_prior, "Prior: a subclass of bayes_polar.bll.model.Prior"),
                                       (load_guide, "Guide: a class or function model -> guide")])
def test_a_file_without_what_is_required(tmp_path, load, what):
    path = tmp_path / "empty.py"
    path.write_text("import torch\n\nclass Helper:\n    pass\n")
    with pytest.raises(ConfigError, match=rf"empty.py must define exactly one public {what} whose name ends in "
                                          r"'\w+'; found none"):
        load(str(path))


def test_a_class_named_prior_that_is_not_a_prior(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text("class GaussPrior:\n    pass\n")
    with pytest.raises(ConfigError, match="found none"):
        load_prior(str(path))


@pytest.mark.parametrize("load", [load_prior, load_guide])
def test_a_missing_file(tmp_path, load):
    with pytest.raises(MissingFileError, match=r"No such file: .*nothing.py"):
        load(str(tmp_path / "nothing.py"))


def test_arguments_a_prior_rejects():
    with pytest.raises(ConfigError, match=r"prior 'isotropic' \(IsotropicPrior\) rejects the arguments "
                                          r"\{'variance': -1\}: Expected variance > 0 but got -1"):
        load_prior("isotropic", variance=-1)
    with pytest.raises(ConfigError, match=r"rejects the arguments \{'scale': 1\}: .*unexpected keyword argument 'scale'"):
        load_prior("isotropic", scale=1)


def test_arguments_a_guide_rejects():
    head = BayesianLastLayer(4, 1)
    with pytest.raises(ConfigError, match=r"guide LowRankGuide rejects the arguments \{'rank': 0\}: "
                                          r"Expected rank >= 1 but got 0"):
        make_guide(load_guide("lowrank", rank=0), head)


def test_all_registry_errors_are_library_errors():
    for cls in (UserModuleError, MissingFileError, ConfigError):
        assert issubclass(cls, BayesPolarError)
