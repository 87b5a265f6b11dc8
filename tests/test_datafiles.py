"""The shipped test data is the published data, byte for byte (tests/data/conformance/README.md)."""

from __future__ import annotations

import hashlib

import pytest
from datafiles import SHA256


@pytest.mark.parametrize("path", sorted(SHA256), ids=lambda p: p.name)
def test_conformance_data_is_the_published_bytes(path) -> None:
    assert path.is_file(), f"{path}: missing (a broken checkout; see tests/data/conformance/README.md)"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[path]
