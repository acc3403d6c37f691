"""Capture and restore the global random generators, so a resumed run draws the same numbers.

Pyro has no generator of its own: ``pyro.util.get_rng_state`` returns exactly the torch,
Python ``random`` and numpy states captured here, so restoring them resumes Pyro exactly too.
numpy's ``Generator`` objects (``np.random.default_rng``) are not global and not covered.

Usage::

    save_checkpoint(run_dir, tensors, {"rng": rng_state()}, step=step)
    set_rng_state(load_checkpoint(run_dir)[1]["rng"])
"""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict:
    """The states of Python ``random``, numpy's global ``RandomState``, torch CPU (and CUDA).

    Torch states are uint8 tensors (stored in safetensors by :func:`save_checkpoint`); the rest
    is JSON (ints, lists of ints, floats), so the dict survives a checkpoint round trip.
    """
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from :func:`rng_state`'s dict (tuples may have become lists)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    np.random.set_state({
        "bit_generator": npy["bit_generator"],
        "state": {"key": np.asarray(npy["key"], dtype=np.uint32), "pos": npy["pos"]},
        "has_gauss": npy["has_gauss"],
        "gauss": npy["gauss"],
    })
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(t, dtype=torch.uint8) for t in state["cuda"]])
