"""Safe loading: no pickle, every torch.load weights-only, remote code only when the user asks for it.

The scans read the source of the installed package (``bayes_polar/``, ``models/``, ``guides/``)
with :mod:`ast`, so a call split over lines or an alias import is still found.
"""
import ast

import pytest

from conftest import REPO

SOURCES = sorted(p for folder in ("bayes_polar", "models", "guides") for p in (REPO / folder).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve"}


def _trees():
    for path in SOURCES:
        yield path.relative_to(REPO), ast.parse(path.read_text(), filename=str(path))


def _dotted(node) -> str:
    """``torch.load`` for ``torch.load``; '' for anything that is not a dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_the_scan_sees_the_package():
    assert len(SOURCES) > 30 and any(p.name == "checkpoint.py" for p in SOURCES)


def test_no_pickle_anywhere():
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{path}:{node.lineno}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(f"{path}:{node.lineno}")
            elif isinstance(node, ast.Call) and _dotted(node.func).endswith(("np.load", "numpy.load")):
                allow = _keyword(node, "allow_pickle")
                if not (isinstance(allow, ast.Constant) and allow.value is False) and allow is not None:
                    found.append(f"{path}:{node.lineno}")
    assert not found, f"pickle-based loading at {found}"


def test_every_torch_load_is_weights_only_and_nothing_is_saved_with_pickle():
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name == "torch.save":
                found.append(f"{path}:{node.lineno}: torch.save (pickle); use safetensors")
            if name == "torch.load" or name.endswith(".torch.load"):
                flag = _keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert not found, found


def test_remote_code_is_never_switched_on_in_the_code():
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                flag = _keyword(node, "trust_remote_code")
                if isinstance(flag, ast.Constant) and flag.value is not False:
                    found.append(f"{path}:{node.lineno}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "trust_remote_code" and not (isinstance(default, ast.Constant) and default.value is False):
                        found.append(f"{path}:{node.lineno}: {node.name} defaults trust_remote_code to not False")
    assert not found, found


def test_the_fit_option_reaches_load_backbone(monkeypatch, tmp_path):
    from bayes_polar import run
    from bayes_polar.cli import build_parser
    from bayes_polar.config import config_from_args

    seen = []

    class Stop(Exception):
        pass

    def load_backbone(name, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise Stop

    monkeypatch.setattr(run, "load_backbone", load_backbone)
    for argv, expected in ((["fit", "--out", "x"], False), (["fit", "--out", "x", "--trust-remote-code"], True)):
        config = config_from_args(build_parser().parse_args(argv))
        with pytest.raises(Stop):
            run.build_pipeline(config)
        assert seen.pop() is expected
