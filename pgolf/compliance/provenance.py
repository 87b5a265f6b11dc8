"""Where a result came from: the code hash, the software environment and the hardware.

Seeds whose provenance differs (code, data, config) are not pooled by aggregation unless explicitly allowed.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pgolf

PACKAGE_DIR = Path(pgolf.__file__).resolve().parent

# The record track's hardware, which the 600 s budgets are stated for: 8 x H100 SXM. torch names the SXM part
# "NVIDIA H100 80GB HBM3" (or "... SXM5 ..."); the PCIe and NVL cards are H100s of lower power and bandwidth.
RECORD_GPU_COUNT = 8
RECORD_GPU_NAME = "H100"
NOT_RECORD_GPU_WORDS = ("pcie", "nvl")


def is_record_gpu(name: object) -> bool:
    """Whether a GPU name (as torch reports it) is the record track's H100 SXM."""
    if not isinstance(name, str) or RECORD_GPU_NAME not in name:
        return False
    return not any(word in name.lower() for word in NOT_RECORD_GPU_WORDS)


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
