"""Atomic, verified checkpoints and run directories.

Layout: ``RUN_DIR/`` holds ``.bayes-polar-run`` (marker from :func:`prepare_run_dir`), the
caller's ``config.json`` / ``metrics.json`` (:func:`atomic_write_json`) and ``checkpoints/``
with ``latest.json`` (``{"checkpoint": "step-00000200", "step": 200}``) and one directory per
checkpoint: ``step-00000200/{tensors.safetensors, state.safetensors, state.json, manifest.json}``.

A checkpoint is a **directory**, not a file plus a manifest: its files are written and fsynced
in a temporary sibling (``.tmp-*``) and one ``os.replace`` publishes them all, manifest
included, which two renames (file, then manifest) could not do atomically. ``latest.json`` is
then replaced atomically and is the source of truth. A crash at any point leaves the old or the
new checkpoint, never a half one; re-saving a step writes ``step-00000200-1`` rather than
replacing a directory in place. One writer per run directory.

``state`` is JSON with str keys, except that tensor leaves (e.g. the torch RNG state of
:func:`rng_state`) go to ``state.safetensors``; tuples come back as lists. No pickle anywhere.

Usage::

    save_checkpoint(run_dir, model_tensors, {"epoch": 3, "rng": rng_state()}, step=200)
    tensors, state, step = load_checkpoint(run_dir); set_rng_state(state["rng"])
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import secrets
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import BayesPolarWarning, CheckpointError, ConfigError
from .rng import rng_state, set_rng_state  # re-exported: RNG state travels in `state`

FORMAT_VERSION = 1
CHECKPOINTS, LATEST, MANIFEST = "checkpoints", "latest.json", "manifest.json"
TENSORS, STATE_TENSORS, STATE = "tensors.safetensors", "state.safetensors", "state.json"
RUN_MARKER = ".bayes-polar-run"
RUN_LOCK = ".bayes-polar-lock"  # see training.lock
_NAME = re.compile(r"^step-(\d+)(?:-(\d+))?$")
_TENSOR_REF = "__tensor__"

__all__ = [
    "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "latest_checkpoint", "load_checkpoint", "prepare_run_dir",
    "rng_state", "save_checkpoint", "set_rng_state", "verify_checkpoint",
]


# ----------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist), write ``data`` and fsync it; mode follows the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a fsynced temporary sibling, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: a fsynced temporary sibling, then ``os.replace``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write_text`)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


# ----------------------------------------------------------------------------- state encoding
def _split_state(obj, key: str, tensors: dict):
    """JSON-able copy of ``obj`` with tensor leaves moved into ``tensors`` (``key``: path, for errors)."""
    if isinstance(obj, torch.Tensor):
        ref = str(len(tensors))  # numbered, not the path: "a/b" and {"a": {"b"}} must not collide
        tensors[ref] = obj.detach().cpu().clone().contiguous()
        return {_TENSOR_REF: ref}
    if isinstance(obj, dict):
        if _TENSOR_REF in obj or not all(isinstance(k, str) for k in obj):
            raise TypeError(f"state{key!r}: keys must be str (and not {_TENSOR_REF!r}), got {list(obj)[:5]}")
        return {k: _split_state(v, f"{key}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_state(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state{key!r}: {type(obj).__name__} is not JSON-able (use str, int, float, bool, "
                    "None, list, dict or Tensor)")


def _join_state(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        return {k: _join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def _encode(tensors: dict, state: dict) -> dict[str, bytes]:
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise TypeError("tensors must be a dict[str, Tensor]")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict but got {type(state).__name__}")
    state_tensors: dict = {}
    state_json = _split_state(state, "", state_tensors)
    model = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return {
        TENSORS: st_save(model),
        STATE_TENSORS: st_save(state_tensors),
        STATE: (json.dumps(state_json) + "\n").encode("utf-8"),
    }


# ----------------------------------------------------------------------------- save
def _fresh_name(root: Path, step: int) -> str:
    name, k = f"step-{step:08d}", 0
    while (root / name).exists():
        k += 1
        name = f"step-{step:08d}-{k}"
    return name


def _manifest(blobs: dict[str, bytes], step: int) -> bytes:
    now = time.time_ns()
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": datetime.fromtimestamp(now / 1e9, timezone.utc).isoformat(),
        "created_ns": now,
        "files": {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in blobs.items()},
    }
    return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or operator.index(value) < minimum:
        raise ValueError(f"Expected an integer {name} >= {minimum} but got {value!r}")
    return operator.index(value)


def save_checkpoint(run_dir, tensors: dict, state: dict | None = None, *, step: int, keep: int = 2) -> Path:
    """Write a verified checkpoint of ``tensors`` and ``state`` atomically; return its directory.

    Parameters
    ----------
    run_dir : path
        Run directory; the checkpoint goes to ``run_dir/checkpoints/step-<step>/``.
    tensors : dict[str, Tensor]
        Model tensors (copied to CPU), stored in ``tensors.safetensors``.
    state : dict, optional
        JSON-able state with str keys; tensor leaves (e.g. :func:`rng_state`) are allowed.
    step : int
        Global step (>= 0), recorded in the manifest and in ``latest.json``.
    keep : int
        Number of most recent checkpoints kept; older ones (and stale ``.tmp-*``) are deleted.
    """
    step, keep = _count("step", step, 0), _count("keep", keep, 1)
    blobs = _encode(tensors, {} if state is None else state)
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = _fresh_name(root, step)
    tmp = root / f".tmp-{name}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        for fname, data in {**blobs, MANIFEST: _manifest(blobs, step)}.items():
            _write_synced(tmp / fname, data)
        _fsync_dir(tmp)
        os.replace(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_json(root / LATEST, {"checkpoint": name, "step": step, "format_version": FORMAT_VERSION})
    _prune(root, keep, protect=name)
    return root / name


def _created(ckpt: Path) -> tuple[int, int, int]:
    """Sort key: creation time from the manifest (mtime if unreadable), then step, then suffix."""
    match = _NAME.match(ckpt.name)
    try:
        created = int(json.loads((ckpt / MANIFEST).read_text())["created_ns"])
    except (OSError, ValueError, KeyError, TypeError):
        created = ckpt.stat().st_mtime_ns
    return created, int(match[1]), int(match[2] or 0)


def _checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first."""
    found = [p for p in root.iterdir() if _NAME.match(p.name) and _inside(p, root)] if root.is_dir() else []
    return sorted(found, key=_created)


def _inside(ckpt: Path, root: Path) -> bool:
    """A real checkpoint directory of ``root``: not a symlink, resolving to a child of ``root``."""
    return ckpt.is_dir() and not ckpt.is_symlink() and ckpt.resolve().parent == root.resolve()


def _prune(root: Path, keep: int, protect: str) -> None:
    """Delete all but the ``keep`` newest checkpoints (never ``protect``), and stale ``.tmp-*``."""
    others = [p for p in _checkpoints(root) if p.name != protect]  # oldest first
    for old in others[: max(0, len(others) + 1 - keep)]:
        shutil.rmtree(old)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- verify and load
class _Invalid(Exception):
    """Why one checkpoint is unusable (the public error adds what to do)."""


def _read_verified(ckpt: Path) -> tuple[dict, dict[str, bytes]]:
    """``(manifest, {file name: bytes})`` after checking every file against the manifest."""
    if not ckpt.is_dir():
        raise _Invalid("it does not exist or is not a directory")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise _Invalid(f"{MANIFEST} is missing (an unfinished copy?)") from None
    except ValueError as exc:
        raise _Invalid(f"{MANIFEST} is not valid JSON ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, dict) and {TENSORS, STATE_TENSORS, STATE} <= set(files)
            and isinstance(manifest.get("step"), int)):
        raise _Invalid(f"{MANIFEST} lacks 'step' or the entries of {TENSORS}, {STATE_TENSORS}, {STATE}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise _Invalid(f"format_version {manifest['format_version']} is newer than this bayes-polar "
                       f"reads ({FORMAT_VERSION}); upgrade bayes-polar")
    return manifest, {name: _read_file(ckpt, name, meta) for name, meta in files.items()}


def _read_file(ckpt: Path, name: str, meta) -> bytes:
    if Path(name).name != name or not isinstance(meta, dict):
        raise _Invalid(f"{MANIFEST} has a bad entry {name!r}")
    try:
        data = (ckpt / name).read_bytes()
    except FileNotFoundError:
        raise _Invalid(f"{name} is missing") from None
    if len(data) != meta.get("size"):
        raise _Invalid(f"{name} has {len(data)} bytes but {MANIFEST} says {meta.get('size')} (truncated?)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("sha256"):
        raise _Invalid(f"{name} has sha256 {digest[:12]}… but {MANIFEST} says "
                       f"{str(meta.get('sha256'))[:12]}… (corrupted)")
    return data


def _decode(blobs: dict[str, bytes]) -> tuple[dict, dict]:
    try:
        tensors = st_load(blobs[TENSORS])
    except Exception as exc:  # checksum matched, so the writer itself was broken
        raise _Invalid(f"{TENSORS} does not parse as safetensors ({exc})") from None
    try:
        state = _join_state(json.loads(blobs[STATE]), st_load(blobs[STATE_TENSORS]))
    except Exception as exc:
        raise _Invalid(f"{STATE} / {STATE_TENSORS} do not parse ({exc})") from None
    return tensors, state


def _is_valid(ckpt: Path) -> bool:
    try:
        return bool(_read_verified(ckpt))
    except _Invalid:
        return False


def _error(ckpt: Path, reason: str) -> CheckpointError:
    other = next((p for p in reversed(_checkpoints(ckpt.parent)) if p != ckpt and _is_valid(p)), None)
    fix = (f"delete it, or resume from {other}, the newest valid checkpoint next to it" if other
           else "delete it and start again (no valid checkpoint next to it)")
    return CheckpointError(f"checkpoint {ckpt} is unusable: {reason}. To fix: {fix}")


def verify_checkpoint(path) -> dict:
    """Check every file of checkpoint ``path`` against its manifest; return the manifest.

    Raises :class:`CheckpointError` naming the file and what is wrong (missing, wrong size,
    wrong sha256, unparsable manifest) and what to do about it.
    """
    ckpt = Path(path)
    try:
        return _read_verified(ckpt)[0]
    except _Invalid as exc:
        raise _error(ckpt, str(exc)) from None


def _root(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS if (run_dir / CHECKPOINTS).is_dir() else run_dir


def _pointer(root: Path) -> Path | None:
    try:
        name = json.loads((root / LATEST).read_text())["checkpoint"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring unreadable {root / LATEST} ({exc}); using the newest valid checkpoint",
                      BayesPolarWarning, stacklevel=4)
        return None
    if not (isinstance(name, str) and _NAME.match(name) and _inside(root / name, root)):
        warnings.warn(f"ignoring {root / LATEST}: {name!r} is not a checkpoint directory of {root}; using the "
                      "newest valid checkpoint", BayesPolarWarning, stacklevel=4)
        return None
    return root / name


def _find_latest(run_dir: Path):
    """``(checkpoint, manifest, blobs)`` of the pointed-to or newest valid checkpoint, or None."""
    root = _root(run_dir)
    pointed = _pointer(root)
    candidates = list(reversed(_checkpoints(root)))
    if pointed is not None:
        candidates = [pointed] + [p for p in candidates if p != pointed]
    problems = []
    for ckpt in candidates:
        try:
            manifest, blobs = _read_verified(ckpt)
        except _Invalid as exc:
            problems.append(f"{ckpt}: {exc}")
            continue
        if problems:
            warnings.warn(f"skipping corrupt checkpoint(s) {'; '.join(problems)}; falling back to {ckpt}. "
                          "Delete the corrupt one(s) once you have checked them", BayesPolarWarning,
                          stacklevel=3)
        return ckpt, manifest, blobs
    if problems:
        raise CheckpointError(f"no valid checkpoint in {root}: {'; '.join(problems)}. "
                              "Delete them and start again")
    return None


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint ``latest.json`` points to, or the newest valid one if that one is corrupt.

    Falling back issues a :class:`BayesPolarWarning` naming the skipped checkpoint and why.
    Returns None when there is no checkpoint at all; raises :class:`CheckpointError` when
    there are checkpoints but none is valid.
    """
    found = _find_latest(Path(run_dir))
    return None if found is None else found[0]


def load_checkpoint(path) -> tuple[dict, dict, int]:
    """Load ``(tensors, state, step)`` from a checkpoint directory, or from a run directory.

    A run directory (or its ``checkpoints/``) resolves through :func:`latest_checkpoint`; a
    checkpoint directory is loaded as is. Every file is verified against the manifest first;
    any problem raises :class:`CheckpointError` saying which file, what is wrong and what to do.
    """
    path = Path(path)
    if _NAME.match(path.name) or (path / MANIFEST).exists() or (path / TENSORS).exists():
        ckpt, found = path, None
    else:
        found = _find_latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}: start without --resume, or point at a run "
                                  "directory that has one")
        ckpt = found[0]
    try:
        manifest, blobs = found[1:] if found else _read_verified(ckpt)
        tensors, state = _decode(blobs)
    except _Invalid as exc:
        raise _error(ckpt, str(exc)) from None
    return tensors, state, manifest["step"]


# ----------------------------------------------------------------------------- run directories
def prepare_run_dir(path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run directory ``path``, refusing to mix with an old non-empty one by accident.

    An existing directory holding more than a never-started run (marker and config.json) needs ``resume`` (kept as is) or ``overwrite``: the old one
    is renamed aside (``<name>.old-<random>``, atomic), the new one created, and only then is
    the old one deleted. Overwrite refuses a directory without the ``.bayes-polar-run`` marker
    this function writes, so a mistyped path is never deleted.
    """
    path = Path(path)
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other: pass only one")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory: choose another output directory")
    if path.is_dir() and not _never_started(path):
        if resume:
            return path
        if not overwrite:
            raise ConfigError(f"run directory {path} exists and is not empty: pass --overwrite to replace it "
                              "or --resume to continue from its latest checkpoint")
        return _replace_run_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    _mark(path)
    return path


def _never_started(path: Path) -> bool:
    """Empty, or only what a run writes before its first step (marker + config.json): a run stopped by bad
    input after creating RUN_DIR leaves nothing to lose, so the corrected command may reuse the folder."""
    names = {p.name for p in path.iterdir()} - {RUN_LOCK}
    return names <= {RUN_MARKER} or (RUN_MARKER in names and names <= {RUN_MARKER, "config.json"})


def _mark(path: Path) -> None:
    atomic_write_json(path / RUN_MARKER, {"created": datetime.now(timezone.utc).isoformat()})


def _replace_run_dir(path: Path) -> Path:
    if not (path / RUN_MARKER).is_file():
        raise ConfigError(f"refusing to overwrite {path}: it has no {RUN_MARKER} marker, so prepare_run_dir "
                          "did not create it; delete it yourself or choose another output directory")
    aside = path.with_name(f"{path.name}.old-{secrets.token_hex(4)}")
    os.replace(path, aside)  # atomic; until the rmtree below the old run is intact at `aside`
    _fsync_dir(path.parent)
    path.mkdir()
    _mark(path)
    shutil.rmtree(aside)
    return path
