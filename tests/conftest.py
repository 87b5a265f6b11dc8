"""Shared test fixtures: paths of the repository, the shared spec folder and the bundled corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
CONFORMANCE_DIR = SHARED_DIR / "conformance"
SAMPLE_DOCS = REPO_ROOT / "data" / "sample" / "docs.jsonl"
PUBLISHED_TOKENIZER = CONFORMANCE_DIR / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


@pytest.fixture
def published_tokenizer() -> Path:
    if not PUBLISHED_TOKENIZER.exists():
        pytest.skip(f"published CaseOps tokenizer not found at {PUBLISHED_TOKENIZER} (shared/ missing)")
    return PUBLISHED_TOKENIZER
