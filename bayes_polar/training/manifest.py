"""sha256 manifests of files that are read back later: a run's final weights, prefix-cache files.

A manifest is a JSON file ``{"files": {name: {"size": n, "sha256": hex}}}`` next to the files it
lists, written atomically *after* them, so it never vouches for a file that is not complete.
``RUN_DIR/checksums.json`` lists ``adapters.safetensors``, ``head.safetensors``, ``layout.json`` and
``zero_shot.safetensors`` (each ensemble member's folder has its own; an ensemble's lists the last two); every prefix-cache file ``X.safetensors`` has ``X.checksums.json``.
:func:`verify` raises :class:`~bayes_polar.errors.ArtifactError` naming the file and what is wrong.

Usage::

    write_manifest(run_dir, ["adapters.safetensors", "head.safetensors"])
    verify(run_dir, "head.safetensors")  # before loading it
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import ArtifactError
from .checkpoint import atomic_write_json

MANIFEST = "checksums.json"  # not manifest.json: that name marks a checkpoint directory


def _entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(folder, names, manifest: str = MANIFEST) -> Path:
    """Checksum ``names`` (files in ``folder``, already written) into ``folder/manifest`` atomically."""
    folder = Path(folder)
    return atomic_write_json(folder / manifest, {"files": {name: _entry(folder / name) for name in names}})


def listed(folder, name: str, manifest: str = MANIFEST) -> bool:
    """Whether ``folder/manifest`` exists and lists ``name`` (files added to a manifest later than others)."""
    try:
        return name in json.loads((Path(folder) / manifest).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify(folder, name: str, manifest: str = MANIFEST) -> Path:
    """``folder/name`` if it exists and matches its entry in ``folder/manifest``; else an ArtifactError."""
    folder = Path(folder)
    path, listing = folder / name, folder / manifest
    try:
        expected = json.loads(listing.read_text())["files"][name]
    except FileNotFoundError:
        raise ArtifactError(f"{path}: {listing} is missing (the run did not finish writing its files)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: {listing} is unreadable or does not list it ({type(exc).__name__}: "
                            f"{exc})") from None
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    found = _entry(path)
    if found["size"] != expected.get("size"):
        raise ArtifactError(f"{path} has {found['size']} bytes but {listing} says {expected.get('size')} "
                            "(truncated?)")
    if found["sha256"] != expected.get("sha256"):
        raise ArtifactError(f"{path} has sha256 {found['sha256'][:12]}… but {listing} says "
                            f"{str(expected.get('sha256'))[:12]}… (corrupted)")
    return path
