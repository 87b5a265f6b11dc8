"""Where a result came from: the code hash, the software environment and the hardware.

Seeds whose provenance differs (code, data, config) are not pooled by aggregation unless explicitly allowed.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pgolf

PACKAGE_DIR = Path(pgolf.__file__).resolve().parent


def code_files() -> list[Path]:
    """Every Python file of the pgolf package, sorted: what the code hash covers."""
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def code_hash() -> str:
    """sha256 over (relative path, contents) of every pgolf source file.

    Inside a bundled train_gpt.py (pgolf.artifact.bundle) there are no source files: the hash of the bundled sources,
    which the bundle's importer sets as ``pgolf.__bundle__["code_hash"]``, is returned instead.
    """
    bundle = getattr(pgolf, "__bundle__", None)
    if isinstance(bundle, dict) and isinstance(bundle.get("code_hash"), str):
        return bundle["code_hash"]
    digest = hashlib.sha256()
    for path in code_files():
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode("utf-8") + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment() -> dict:
    """Versions of the software that decides the numbers, and the accelerator if any."""
    import numpy
    import torch

    env = {
        "pgolf_version": pgolf.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "gpu_count": 0,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import flash_attn_interface  # noqa: F401

        env["flash_attn"] = "3"
    except ImportError:
        env["flash_attn"] = None
    try:  # the artifact's compressor: another version may write other bytes for the same model
        import brotli

        env["brotli"] = getattr(brotli, "__version__", None)
    except ImportError:
        env["brotli"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    return env
