"""Adapter-test fixtures: the shared tiny Llama, built once and deep-copied per test, and a sentence."""
from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="session")
def _tiny_llama_template():
    from bayes_polar.data.backbone import tiny_random_llama

    return tiny_random_llama()


@pytest.fixture
def tiny_llama(_tiny_llama_template):
    """Same contract as ``tests/conftest.py``'s ``tiny_llama`` (a fresh model per test), without
    reloading the tokenizer each time: that load dominates (1-4 s) while a deep copy takes 20 ms."""
    model, tokenizer = _tiny_llama_template
    return copy.deepcopy(model), tokenizer


@pytest.fixture
def sentence_ids(tiny_llama) -> torch.Tensor:
    """(1, L) token ids of a short real sentence, for next-token cross-entropy."""
    _, tokenizer = tiny_llama
    text = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."
    return tokenizer(text, return_tensors="pt").input_ids



@pytest.fixture
def fresh_tiny_llama(_tiny_llama_template):
    """A factory of further fresh tiny Llamas (model only), for tests that need two models."""
    return lambda: copy.deepcopy(_tiny_llama_template[0])
