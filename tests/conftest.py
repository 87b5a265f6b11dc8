"""Shared test fixtures: paths of the repository, the shipped test data and the bundled corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from datafiles import CONFORMANCE_DIR, PUBLISHED_TOKENIZER, REPO_ROOT, SAMPLE_DOCS  # noqa: F401


@pytest.fixture
def published_tokenizer() -> Path:
    return PUBLISHED_TOKENIZER


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one CPU thread for a module of tiny-tensor tests (one thread is faster there, and CI's 2 cores
    are shared); the thread count is restored after the module. Use: ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

