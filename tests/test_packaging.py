"""Install layout and pins: environment.yml agrees with pyproject.toml; models/ and guides/ live in bayes_polar."""
import importlib.util
import re
import subprocess
import sys
import tomllib

from conftest import REPO


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _environment_pip_requirements():
    lines = (REPO / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    return [line.strip()[2:].strip() for line in lines[start + 1:] if line.strip().startswith("- ")]


def _environment_python():
    text = (REPO / "environment.yml").read_text()
    return re.search(r"-\s*python=(\S+)", text).group(1)


def test_environment_yml_matches_pyproject():
    project = _pyproject()["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert _environment_pip_requirements() == expected
    assert _environment_python() == "3.11"
    assert project["requires-python"] == ">=3.11"


def test_torch_is_pinned_to_the_cpu_wheel_version():
    assert "torch==2.13.0" in _pyproject()["project"]["dependencies"]


def test_models_and_guides_install_inside_bayes_polar():
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"bayes_polar": "bayes_polar", "bayes_polar.models": "models",
                                         "bayes_polar.guides": "guides"}
    assert "models" not in setuptools["packages"] and "guides" not in setuptools["packages"]
    for name in ("bayes_polar.models", "bayes_polar.guides"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin.startswith(str(REPO))
    code = "import importlib.util as u; print(u.find_spec('models'), u.find_spec('guides'))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


def test_console_script_has_help():
    exe = REPO / ".venv" / "bin" / "bayes-polar"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bayes_polar.cli"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, check=True)
    assert "usage: bayes-polar" in out.stdout


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and ci.strip().splitlines()[-1] == "make test"
