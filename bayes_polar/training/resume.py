"""What ``--resume`` may change, checked before RUN_DIR's ``config.json`` is rewritten.

A resumed run must reproduce an uninterrupted one, so its configuration must equal the run's:
the one in ``config.json`` *and* the one stored in every checkpoint (``state["config"]``; a
run whose config.json is gone is still checked). Only :data:`FREE` options may differ. ``steps``
sets the learning-rate schedule: fewer steps than a checkpoint has done is refused; any other
change of a cosine or linear schedule only with ``extend`` (it is then stretched, and a line says
so). A constant schedule does not depend on ``steps``: more steps continue it exactly.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import BayesPolarWarning, ConfigError
from .checkpoint import RUN_MARKER, latest_checkpoint, load_checkpoint

FREE = ("threads", "on_nan", "max_skipped_batches")  # change nothing an uninterrupted run computes
# target_modules: the default was "q_proj,v_proj" before "auto"; the two adapt the same modules of every model
# a run can exist on (the families with q_proj default to it; Phi-3 and GPT-NeoX have no q_proj)
SAME_TARGETS = {"auto", "q_proj,v_proj"}


def has_run(run_dir) -> bool:
    """Whether ``run_dir`` was made by ``fit``: its marker, a config.json or a checkpoint (the run's or a member's)."""
    run_dir = Path(run_dir)
    return any((run_dir / name).is_file() for name in (RUN_MARKER, "config.json")) or \
        any(run_dir.glob("checkpoints/step-*")) or any(run_dir.glob("members/*/checkpoints/step-*"))


def check_resume(config, saved: dict | None, checkpoints: list[tuple[Path, object]], extend: bool, source) -> None:
    """Refuse a resume of ``config`` that ``saved`` (config.json as written, or None) or a checkpoint contradicts.

    ``saved`` stays the file's dict: Python objects of the run (a prior defined in a notebook) are
    compared by the ``python:<repr>`` they were recorded as. ``checkpoints``: ``(folder, expected
    config)`` pairs; an ensemble member's folder expects its member config.
    """
    old = None if saved is None else saved.get("steps")
    if saved is not None:
        _same_run(config, saved, source)
    done = 0
    for folder, expected in checkpoints:
        with warnings.catch_warnings():  # a skipped corrupt checkpoint is reported once, when training loads it
            warnings.simplefilter("ignore", BayesPolarWarning)
            found = latest_checkpoint(folder)
            if found is None:
                continue
            _, state, step = load_checkpoint(found)
        if "config" in state:
            _same_run(expected, state["config"], f"checkpoint {found}")
        done = max(done, step)
        if config.steps < step:
            raise ConfigError(f"--resume with --steps {config.steps}, but checkpoint {found} is at step {step}: a "
                              "run cannot end before where it already is (pass --steps "
                              f"{old if old is not None else step} or more)")
    if old is not None and config.steps != old and config.schedule != "constant" and not extend:
        raise ConfigError(f"--resume with --steps {config.steps}, but the run was planned for {old}: the "
                          f"{_schedule(config)} would change from step {done} on, matching no uninterrupted run; "
                          f"pass --extend to continue anyway, or resume with --steps {old}")


def _schedule(config) -> str:
    return (f"{config.schedule} learning-rate schedule ({config.warmup_step_count} warm-up steps, then {config.schedule} "
            "over all --steps)")


def steps_notice(config, saved: dict | None) -> str | None:
    """The line a resumed run prints when it runs to another ``steps`` than planned, or None."""
    old = None if saved is None else saved.get("steps")
    if old is None or old == config.steps:
        return None
    if config.schedule == "constant":
        return (f"resuming to {config.steps} steps instead of {old}: the constant learning-rate schedule "
                "does not depend on --steps, so this equals an uninterrupted run of that length")
    return (f"--extend: steps {old} -> {config.steps}; the {_schedule(config)} now spans {config.steps} "
            "steps, so the result matches no uninterrupted run")


def _same_run(config, stored: dict, source) -> None:
    current = config.to_dict()
    changed = sorted(k for k, v in current.items() if k not in FREE and k != "steps" and stored.get(k, v) != v
                     and not (k == "target_modules" and {v, stored[k]} <= SAME_TARGETS))
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {current[k]!r}" for k in changed[:6])
        raise ConfigError(f"--resume with a different configuration than {source} ({details}); resume with the "
                          "same options (only --steps with --extend, --threads, --on-nan and --max-skipped-batches "
                          "may change)")
