"""Paths of the test data shipped in the repository (tests/data/): one definition for every test module.

A missing file is a broken checkout: the tests that read these fail, they do not skip.
"""

from __future__ import annotations

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
CONFORMANCE_DIR = TESTS_DIR / "data" / "conformance"
PUBLISHED_TOKENIZER = CONFORMANCE_DIR / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
CASEOPS_VECTORS = CONFORMANCE_DIR / "caseops_vectors.jsonl"
SAMPLE_DOCS = REPO_ROOT / "data" / "sample" / "docs.jsonl"
SHA256 = {
    PUBLISHED_TOKENIZER: "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d",
    CASEOPS_VECTORS: "06076113c93e3e36e0e89be7df1de9dbb83d6f5d51ec1d5c24e9e540b60f5902",
}
