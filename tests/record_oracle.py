"""The record's own script (PR #1855 ``train_gpt.py``) imported as an ORACLE for tests, on a CPU-only machine.

No line of the record goes into pgolf: tests import the script and compare pgolf's numbers with its functions.
The script is found through ``PGOLF_RECORD_SCRIPT``, by default ``<repo>/../shared/reference/pr1855/train_gpt.py``;
tests call :func:`load_or_skip`, which skips with that reason when the script is absent.

What the script needs that a CPU box lacks, and what stands in for it here (test-only):

* ``flash_attn_interface`` (FlashAttention 3): ``shared/reference/shim`` goes on ``sys.path`` so the import works,
  then the module's two attention functions are replaced by :func:`exact_varlen_attention` (one causal SDPA per
  ``cu_seqlens`` segment) and :func:`dense_causal_attention`. Why not the shim's ``FA3_SHIM=exact``: the shim reads
  the variable once, at its first import, and its dense path lets attention cross documents whenever the row
  length is a multiple of max_seqlen.
* ``triton`` when it is not installed: a stub that lets the script DEFINE its kernels (none runs on CPU:
  ``FUSED_CE_ENABLED=0``, and models built here turn the fused MLP off).
* ``torch.compile`` is the identity while the script is imported (``@torch.compile`` on its Newton-Schulz) and
  inside :func:`cpu_patches`, which also turns the CUDA stream, synchronize and pinned-memory calls of its
  training code into no-ops.

The script registers torch custom ops at import, so it is imported ONCE per process; every test shares that
module and sets its own hyperparameters on instances (:func:`record_hparams`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCRIPT = REPO_ROOT.parent / "shared" / "reference" / "pr1855" / "train_gpt.py"
MODULE_NAME = "pr1855_train_gpt"
BOS_ID = 1


def record_script() -> Path:
    """Where the record script is expected (``PGOLF_RECORD_SCRIPT`` or the default beside the repository)."""
    return Path(os.environ.get("PGOLF_RECORD_SCRIPT", DEFAULT_SCRIPT))


# ------------------------------------------------------------------------------------------------ stand-ins


def _install_triton_stub() -> list[str]:
    """Enough of ``triton`` for the script to import; its kernels are defined, never launched. Returns the module
    names it put in ``sys.modules`` (none when triton is installed): the caller takes them out again after the
    import, so that pgolf code run later in the same process sees no triton, as it would without the oracle."""
    try:
        import triton  # noqa: F401

        return []
    except ImportError:
        pass

    class _Anything:
        def __getattr__(self, name):
            return _Anything()

        def __call__(self, *args, **kwargs):
            return _Anything()

    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    triton.cdiv = lambda a, b: (a + b - 1) // b
    language = types.ModuleType("triton.language")
    def _language_attribute(name):  # tl.constexpr in annotations, tl.float32, ...; never a dunder: inspect reads
        if name.startswith("__"):  # __file__ of every module in sys.modules, and a stub path breaks it
            raise AttributeError(name)
        return _Anything()

    language.__getattr__ = _language_attribute
    tools = types.ModuleType("triton.tools")
    descriptor = types.ModuleType("triton.tools.tensor_descriptor")
    descriptor.TensorDescriptor = type("TensorDescriptor", (), {})
    triton.language, triton.tools, tools.tensor_descriptor = language, tools, descriptor
    stubs = {"triton": triton, "triton.language": language, "triton.tools": tools,
             "triton.tools.tensor_descriptor": descriptor}
    sys.modules.update(stubs)
    return list(stubs)


def exact_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, **kwargs):
    """FlashAttention's varlen semantics, exactly: one SDPA per ``cu_seqlens`` segment (repeated ends allowed).

    q [N, H, D], k/v [N, Hkv, D]; scale 1/sqrt(D); query head h reads KV head h // (H // Hkv).
    """
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise ValueError("exact_varlen_attention: different q and k segments")
    bounds = [int(c) for c in cu_seqlens_q.tolist()]
    out = torch.zeros_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seg = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                is_causal=causal, enable_gqa=q.size(1) != k.size(1),
            )  # [H, n, D]
            out[start:end] = seg.transpose(0, 1)
    return out


def dense_causal_attention(q, k, v, causal=True, **kwargs):
    """FlashAttention's dense call: q [B, T, H, D], k/v [B, T, Hkv, D], causal within each row."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=q.size(2) != k.size(2)
    )
    return out.transpose(1, 2)


class _NoStream:
    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


def _identity_compile(model=None, **kwargs):
    return (lambda fn: fn) if model is None else model


@contextlib.contextmanager
def cpu_patches():
    """The CUDA-only calls of the record's training code made no-ops, ``torch.compile`` the identity (restored
    on exit)."""
    real_empty = torch.empty

    def empty_without_pinning(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return real_empty(*args, **kwargs)

    saved = {
        (torch, "compile"): torch.compile,
        (torch, "empty"): torch.empty,
        (torch.Tensor, "pin_memory"): torch.Tensor.pin_memory,
        (torch.cuda, "Stream"): torch.cuda.Stream,
        (torch.cuda, "stream"): torch.cuda.stream,
        (torch.cuda, "current_stream"): torch.cuda.current_stream,
        (torch.cuda, "synchronize"): torch.cuda.synchronize,
        (torch.cuda, "max_memory_allocated"): torch.cuda.max_memory_allocated,
        (torch.cuda, "max_memory_reserved"): torch.cuda.max_memory_reserved,
    }
    torch.compile = _identity_compile
    torch.empty = empty_without_pinning
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.cuda.Stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.max_memory_reserved = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


# --------------------------------------------------------------------------------------------------- loading

_RECORD: Optional[types.ModuleType] = None


def load_record() -> types.ModuleType:
    """The record script as a module, imported once per process (FileNotFoundError when it is absent)."""
    global _RECORD
    if _RECORD is not None:
        return _RECORD
    script = record_script()
    if not script.is_file():
        raise FileNotFoundError(f"record script not found at {script} (set PGOLF_RECORD_SCRIPT)")
    os.environ["FUSED_CE_ENABLED"] = "0"
    os.environ.setdefault("FA3_SHIM", "exact")
    shim = script.parent.parent / "shim"
    if shim.is_dir() and str(shim) not in sys.path:
        sys.path.insert(0, str(shim))
    stubs = _install_triton_stub()
    spec = importlib.util.spec_from_file_location(MODULE_NAME, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        with cpu_patches():
            spec.loader.exec_module(module)
    finally:
        for name in stubs:  # the script keeps its own references; nothing else may take the stub for triton
            sys.modules.pop(name, None)
    module.flash_attn_varlen_func = exact_varlen_attention
    module.flash_attn_3_func = dense_causal_attention
    module.BOS_ID = BOS_ID  # the record sets it in its first loader; a bare forward needs it too
    module.set_logging_hparams(types.SimpleNamespace(is_main_process=False, logfile=None))  # silence its log()
    _RECORD = module
    return module


def load_or_skip() -> types.ModuleType:
    """:func:`load_record`, or skip the calling test with the reason when the script is absent."""
    try:
        return load_record()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def record_hparams(module: types.ModuleType, **overrides):
    """A ``Hyperparameters`` instance with instance attributes overriding the class ones (which the script read
    from the environment at import). Unknown names are an error, so a typo cannot silently test the defaults."""
    h = module.Hyperparameters()
    for name, value in overrides.items():
        if not hasattr(h, name):
            raise AttributeError(f"record Hyperparameters has no {name!r}")
        setattr(h, name, value)
    return h
