"""Fixtures shared by the fisherlens tests (models and data: ``zoo.py``; references: ``reference.py``; small
helpers: ``helpers.py``).  Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""

from __future__ import annotations

import pytest
import torch

import fisherlens as fl


@pytest.fixture(scope="module")
def float64():
    """float64 by default (and one intra-op thread: these models are tiny) for a test module.

    Module-scoped so that hypothesis tests can use it; modules opt in with
    ``pytestmark = pytest.mark.usefixtures("float64")``.
    """
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old_dtype)
    torch.set_num_threads(old_threads)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny models gain nothing from intra-op threads, and on a busy machine
    OpenMP spin-waits make them many times slower (the setting is restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_factors(monkeypatch):
    """Make building the structured factors (``fl.structure.factors``) an error: a refusal must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("the factors were built before the memory refusal")

    monkeypatch.setattr(fl.structure, "factors", boom)
