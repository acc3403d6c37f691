"""What a run directory may decide when it is loaded again: data and numbers, never code or write paths.

``config.json`` is data anyone could have written. :func:`loading_config` turns it into the
config :func:`~bayes_polar.run.load_run` builds from, under the *caller's* say on three things:

- ``trust_remote_code``: a model's own Python code runs only when this command passes it
  (``--trust-remote-code``); a run that needed it without it is an error saying so.
- a prior or guide that is a ``.py`` file runs only when the command re-passes the file
  (``--prior FILE`` / ``--guide FILE``) or passes ``--allow-code-from-run``; either way one
  warning line says that file executes.
- ``cache_dir`` from the run is ignored: the prefix cache goes where this command says
  (``--cache-dir``), or stays in memory.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from .bll.registry import is_code_path
from .config import FitConfig, read_json
from .errors import BayesPolarWarning, ConfigError


def loading_config(run_dir, *, trust_remote_code: bool = False, allow_code_from_run: bool = False,
                   prior=None, guide=None, cache_dir: str | None = None, device: str | None = None,
                   dtype: str | None = None) -> FitConfig:
    """``run_dir/config.json`` with code and write locations decided by the arguments, not the file.

    ``prior``/``guide``: a ``.py`` file re-passed (it runs), or the Python object (a
    :class:`~bayes_polar.bll.model.Prior`, a guide builder) the run was configured with: config.json
    records such objects only by their repr. ``device``/``dtype`` override where the backbone runs.
    """
    path = Path(run_dir) / "config.json"
    values = read_json(path, "the configuration")
    given = {"prior": prior, "guide": guide}
    values.update({k: v for k, v in given.items() if v is not None and not isinstance(v, str)})
    values.update({k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    config = FitConfig.from_dict(values, source=path)
    if config.trust_remote_code and not trust_remote_code:
        raise ConfigError(f"{path} sets trust_remote_code: the model {config.model!r} runs its own Python code; "
                          "pass --trust-remote-code (trust_remote_code=True) if you trust it")
    choices = {}
    for kind in ("prior", "guide"):
        name = getattr(config, kind)
        if not isinstance(name, str):  # the caller's own object
            continue
        passed = given[kind]
        if passed is not None and not is_code_path(passed):
            raise ConfigError(f"--{kind} {passed!r}: when loading a run, --{kind} only re-passes the run's .py file "
                              f"(the run was fitted with {name!r})")
        name = passed if passed is not None else name
        if is_code_path(name):
            if passed is None and not allow_code_from_run:
                raise ConfigError(f"{path} names the {kind} file {name}: Python code runs only if you pass "
                                  f"--{kind} {name} again or --allow-code-from-run (allow_code_from_run=True)")
            warnings.warn(f"the {kind} file {name} executes (Python code)", BayesPolarWarning, stacklevel=2)
        choices[kind] = name
    return replace(config, trust_remote_code=trust_remote_code, cache_dir=cache_dir, **choices)
