"""Compile caches for warm-up measurements: both sides start cold (issue 16: pgolf's warm-up against the record's,
"measured the same way").

Inductor keeps compiled graphs (its FX graph and AOT autograd caches) on disk, by default under
``/tmp/torchinductor_<user>``, and Triton keeps its compiled kernels under ``~/.triton``. A run after another one on
the same machine (the record's side-by-side run, a pgolf bench) finds them and compiles less, so a warm-up figure
compares with another only when both started from the same state. ``benchmarks/record_warmup.py`` and
``benchmarks/pgolf_warmup.py`` therefore point both caches at new, empty folders unless told ``--compile-cache
inherit`` (whatever the environment has), and record which they did.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

MODES = ("cold", "inherit")
CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def compile_cache_env(mode: str, prefix: str) -> dict[str, str]:
    """Environment variables for the measured process: for ``cold``, two new empty folders under the system's
    temporary folder (set them before torch is imported); for ``inherit``, none."""
    if mode == "inherit":
        return {}
    if mode != "cold":
        raise ValueError(f"--compile-cache: expected one of {', '.join(MODES)}, got {mode!r}")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    env = {}
    for variable, name in zip(CACHE_VARIABLES, ("inductor", "triton")):
        (root / name).mkdir()
        env[variable] = str(root / name)
    return env
