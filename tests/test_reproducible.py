"""Issue 21, piece by piece: nothing that depends on the entry point, a path, a time or the machine's default
thread count reaches an artifact byte or a counted byte. (tests/test_reproduce.py runs the whole claim: the staged
pipeline and the folder's train_gpt.py give the same artifact.)"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from pgolf.io import sha256_file
from pgolf.train.checkpoint import WEIGHTS_NAME, read_checkpoint_meta, save_checkpoint


def test_checkpoint_bytes_depend_on_the_weights_only(tmp_path: Path) -> None:
    """torch.save to a (temporary, random) path names the zip records after it; the checkpoint saves through
    memory, so the same weights give the same model.pt and weights_sha256 wherever and however often saved."""
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16)}
    save_checkpoint(tmp_path / "a", state, {"model_config": {}})
    save_checkpoint(tmp_path / "elsewhere" / "b", state, {"model_config": {}})
    a, b = tmp_path / "a" / WEIGHTS_NAME, tmp_path / "elsewhere" / "b" / WEIGHTS_NAME
    assert a.read_bytes() == b.read_bytes()
    assert read_checkpoint_meta(a.parent)["weights_sha256"] == read_checkpoint_meta(b.parent)["weights_sha256"] == sha256_file(a)
    assert {name.split("/")[0] for name in zipfile.ZipFile(a).namelist()} == {"archive"}
