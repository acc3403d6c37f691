"""Shared fixtures: pinned threads, seeds, a clean Pyro param store, tiny and real backbones, data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # 2 shared cores: 1 thread is stable, 2 can be 50x slower

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed_and_clear():
    import pyro

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _data_dir() -> Path | None:
    value = os.environ.get("BAYES_POLAR_DATA")
    candidates = [Path(value)] if value else [REPO.parent / "shared" / "data"]
    for path in candidates:
        if (path / "arc_easy").is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The local benchmark mirror; CI sets BAYES_POLAR_REQUIRE_DATA=1 so it can never be skipped there."""
    path = _data_dir()
    if path is None:
        if os.environ.get("BAYES_POLAR_REQUIRE_DATA") == "1":
            pytest.fail("BAYES_POLAR_DATA does not point at the benchmark data")
        pytest.skip("benchmark data not found: set BAYES_POLAR_DATA")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from bayes_polar.data.backbone import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def tiny_llama():
    """``(model, tokenizer)``: a fresh 2-block random Llama (hidden 32) built from a config."""
    from bayes_polar.data.backbone import tiny_random_llama

    return tiny_random_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct backbone (session-wide: treat as read-only)."""
    from bayes_polar.data.backbone import load_backbone

    return load_backbone("smollm2-135m")
