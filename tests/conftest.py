"""Shared test fixtures: paths of the repository, the shipped test data and the bundled corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from datafiles import CONFORMANCE_DIR, PUBLISHED_TOKENIZER, REPO_ROOT, SAMPLE_DOCS  # noqa: F401


@pytest.fixture
def published_tokenizer() -> Path:
    return PUBLISHED_TOKENIZER
