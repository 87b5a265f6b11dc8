"""Causal attention over PACKED token rows, with one of three interchangeable backends.

A micro-batch is one 1-D row of T tokens holding many documents back to back. ``cu_seqlens`` (int32,
``[n_segments + 1]``) lists where each segment starts, ending with T; attention never crosses a segment
boundary, so a document is scored exactly as if it were alone (rule: token-mixing must not leak across
documents). Segments are the BOS-delimited documents, additionally cut every ``max_seqlen`` tokens
(``build_cu_seqlens``), so ``max_seqlen`` is an upper bound on every segment's length.

Static-shape contract (for ``torch.compile``): ``cu_seqlens`` may be padded at the end with repeated final
values (zero-length segments, see ``pad_cu_seqlens``) so that a handful of bucketed lengths cover every
batch; all backends and ``segment_positions`` treat zero-length segments as absent.

Backends (``backend=`` names one; ``select_backend`` picks the best probed one for a device type):
  - ``fa3``: FlashAttention-3 ``flash_attn_interface.flash_attn_varlen_func`` (CUDA, Hopper; native GQA). The
    shared reference's stand-in module of the same name (``shared/reference/shim``) is recognised and refused;
  - ``fa4``: FlashAttention-4 ``flash_attn.cute`` (CUDA, Hopper and Blackwell; native GQA), as opaque custom ops
    (``pgolf.model.flash4``), probed lazily (its import is slow);
  - ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA; its keyword set differs between
    torch versions, so it is inspected at run time);
  - ``sdpa``: ``F.scaled_dot_product_attention`` with a block-diagonal causal mask (CPU, tests, fallback).
    It is banded: each block of ``max_seqlen`` queries sees only its own and the previous key block, so
    memory is O(T * max_seqlen) rather than O(T^2).
The recipe key ``model.attention_backend`` (``auto | fa3 | fa4 | torch``) is resolved once per stage, outside any
compiled region, by :func:`resolve_backend`; the result names the kernels, their versions and why they were
chosen, and goes into every training and evaluation record.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("fa3", "fa4", "torch_varlen", "sdpa")
ATTENTION_BACKENDS = ("auto", "fa3", "fa4", "torch")  # model.attention_backend (the recipe key)


# --------------------------------------------------------------------------------------------------------------
# Segment bookkeeping
# --------------------------------------------------------------------------------------------------------------


def build_cu_seqlens(input_ids: Tensor, bos_id: int = 1, max_seqlen: int = 2048) -> tuple[Tensor, int]:
    """Segment starts of a packed row: position 0, every BOS, and every ``max_seqlen`` tokens inside a document.

    input_ids: [T] integer token ids. Returns ``(cu_seqlens, max_seqlen)``: int32 ``[n_segments + 1]`` on the
    ids' device (last entry T) and the bound itself, an int. The bound (not the realized maximum) is returned
    so no host sync is needed and compiled graphs see a constant.

    The output length depends on the data (it uses ``nonzero``): call it in the data loader or eagerly, not
    inside a compiled region; compiled callers pad the result with ``pad_cu_seqlens``.
    """
    if input_ids.ndim != 1:
        raise ValueError(f"build_cu_seqlens: input_ids must be 1-D [T], got shape {tuple(input_ids.shape)}")
    if max_seqlen < 1:
        raise ValueError(f"build_cu_seqlens: max_seqlen must be >= 1, got {max_seqlen}")
    num_tokens = input_ids.numel()
    device = input_ids.device
    if num_tokens == 0:
        return torch.zeros(1, dtype=torch.int32, device=device), max_seqlen
    positions = torch.arange(num_tokens, device=device)
    doc_start_mask = input_ids == bos_id
    doc_start_mask[0] = True  # a row may begin mid-document
    # position of each token's document start = running max of start positions
    doc_start_pos = torch.where(doc_start_mask, positions, torch.zeros_like(positions))
    doc_start_pos = torch.cummax(doc_start_pos, dim=0).values
    offset_in_doc = positions - doc_start_pos
    segment_start_mask = offset_in_doc % max_seqlen == 0
    starts = torch.nonzero(segment_start_mask).flatten()
    end = torch.tensor([num_tokens], device=device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32), max_seqlen


def pad_cu_seqlens(cu_seqlens: Tensor, num_entries: int) -> Tensor:
    """Pad ``cu_seqlens`` to ``num_entries`` entries by repeating its last value (zero-length segments).

    Lets a compiled model see a few bucketed shapes instead of one per segment count.
    """
    n = cu_seqlens.numel()
    if num_entries < n:
        raise ValueError(f"pad_cu_seqlens: cu_seqlens has {n} entries, more than the requested {num_entries}")
    if num_entries == n:
        return cu_seqlens
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(num_entries - n)])


def segment_ids(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """Index of the segment each token belongs to: int64 [T]. Zero-length segments own no token."""
    t = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # right=True picks the LAST boundary <= t, which skips repeated (zero-length) boundaries
    return torch.searchsorted(cu_seqlens, t, right=True) - 1


def segment_positions(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """Position of each token within its segment (RoPE restarts at every segment): int64 [T]."""
    t = torch.arange(num_tokens, device=cu_seqlens.device, dtype=torch.int64)
    starts = cu_seqlens.to(torch.int64)[segment_ids(cu_seqlens, num_tokens)]
    return t - starts


def check_cu_seqlens(cu_seqlens: Tensor, num_tokens: int, max_seqlen: int) -> None:
    """Raise ValueError unless cu_seqlens starts at 0, ends at T, never decreases and respects max_seqlen.

    Reads values (a host sync on GPU); callers use it where that is free (CPU) or when debugging.
    """
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected 1-D with >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens: first entry must be 0, got {cu[0].item()}")
    if cu[-1].item() != num_tokens:
        raise ValueError(f"cu_seqlens: last entry must equal the number of tokens {num_tokens}, got {cu[-1].item()}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        raise ValueError("cu_seqlens: entries must be non-decreasing")
    longest = int(lengths.max().item())
    if longest > max_seqlen:
        raise ValueError(f"cu_seqlens: a segment has {longest} tokens, more than max_seqlen={max_seqlen}")


# --------------------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------------------


def is_reference_shim(module) -> bool:
    """True for ``shared/reference/shim/flash_attn_interface.py``: a stand-in that lets the record script import
    (SDPA or FA4 underneath, selected by ``FA3_SHIM``), not FlashAttention 3. pgolf must never call it "fa3"."""
    doc = (getattr(module, "__doc__", None) or "").lstrip()
    return doc.startswith("Stand-in for FlashAttention-3") or (hasattr(module, "MODE") and hasattr(module, "_exact"))


def _import_fa3() -> tuple[Optional[Callable], str]:
    try:
        import flash_attn_interface  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a broken CUDA extension raising at import time
        return None, f"flash_attn_interface does not import ({type(exc).__name__})"
    if is_reference_shim(flash_attn_interface):
        where = getattr(flash_attn_interface, "__file__", "?")
        return None, f"flash_attn_interface at {where} is the shared reference's stand-in, not FlashAttention 3"
    fn = getattr(flash_attn_interface, "flash_attn_varlen_func", None)
    return (fn, "ok") if fn is not None else (None, "flash_attn_interface has no flash_attn_varlen_func")


def _import_torch_varlen() -> Optional[Callable]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


# Probed once at import, never inside a forward: torch.compile must not trace imports or inspect.signature.
_FA3_FN, _FA3_WHY = _import_fa3()
_TORCH_VARLEN_FN = _import_torch_varlen()
_TORCH_VARLEN_KEYWORDS = (
    frozenset(inspect.signature(_TORCH_VARLEN_FN).parameters) if _TORCH_VARLEN_FN is not None else frozenset()
)
_FA4: Optional[Callable] = None  # pgolf.model.flash4.attend once FA4 has been probed and imports
_FA4_WHY = "not probed"


def probe_fa4() -> tuple[bool, str]:
    """Import FlashAttention 4 (once; seconds) and register pgolf's ops for it: (usable, reason). Call it eagerly,
    before compiling: :func:`resolve_backend` and :func:`available_backends` on CUDA do."""
    global _FA4, _FA4_WHY
    if _FA4_WHY == "not probed":
        try:
            from pgolf.model import flash4
        except Exception as exc:  # torch without torch.library.custom_op, ...
            _FA4_WHY = f"pgolf.model.flash4 does not import ({type(exc).__name__}: {exc})"
        else:
            ok, _FA4_WHY = flash4.load()
            _FA4 = flash4.attend if ok else None
    return _FA4 is not None, _FA4_WHY


def _sm(device: torch.device) -> Optional[int]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _status(name: str, device: torch.device) -> str:
    """"ok" when backend ``name`` can run on ``device``, else why not (probes FA4 only when asked about it)."""
    if name == "sdpa":
        return "ok"
    if device.type != "cuda":
        return f"needs CUDA, got {device.type}"
    sm = _sm(device)
    if name == "fa3":
        return _FA3_WHY if _FA3_FN is None else ("ok" if sm is None or sm // 10 == 9 else f"sm{sm}: FA3 is for Hopper")
    if name == "fa4":
        ok, why = probe_fa4()
        return why if not ok else ("ok" if sm is None or sm // 10 in (9, 10, 11) else f"sm{sm}: no FA4 backward")
    return "ok" if _TORCH_VARLEN_FN is not None else "torch.nn.attention.varlen is missing"


def available_backends(device: torch.device | str) -> list[str]:
    """Backends usable on ``device``, fastest first (fa3, fa4, torch_varlen, sdpa)."""
    return [name for name in BACKENDS if _status(name, torch.device(device)) == "ok"]


def select_backend(device: torch.device | str) -> str:
    """The fastest backend for this device type. Inside a compiled region nothing new is probed (FA4 counts only
    when already probed); call :func:`resolve_backend` before compiling."""
    device = torch.device(device)
    if torch.compiler.is_compiling() and device.type == "cuda":
        return "fa3" if _FA3_FN is not None else "fa4" if _FA4 is not None else "torch_varlen"
    return available_backends(device)[0]


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """What ``model.attention_backend`` resolved to on one device (recorded with every result)."""

    requested: str  # the recipe value: auto | fa3 | fa4 | torch
    resolved: str  # the kernels: fa3 | fa4 | torch_varlen | sdpa
    versions: dict  # torch, flash_attn_3, flash_attn_4 (None where not installed)
    reason: str  # why these kernels (and why faster ones were passed over)

    def as_record(self) -> dict:
        return dataclasses.asdict(self)


def _version(*dists: str) -> Optional[str]:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except Exception:
            continue
    return None


def resolve_backend(requested: str, device: torch.device | str) -> BackendChoice:
    """Resolve a recipe value on ``device``: ``auto`` = the fastest usable (fa3, then fa4, then torch's kernels);
    ``torch`` = torch's varlen kernels on CUDA, the banded SDPA on CPU; ``fa3``/``fa4`` that cannot run raise
    (a result must name the kernels that produced it). Probes FA4 on CUDA: call it eagerly."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend: expected one of {', '.join(ATTENTION_BACKENDS)}, got {requested!r}")
    device = torch.device(device)
    versions = {"torch": torch.__version__, "flash_attn_3": _version("flash_attn_3", "flash-attn-3"),
                "flash_attn_4": _version("flash-attn-4")}
    if requested in ("fa3", "fa4"):
        why = _status(requested, device)
        if why != "ok":
            raise RuntimeError(f"model.attention_backend {requested!r} cannot run on {device}: {why}")
        return BackendChoice(requested, requested, versions, "requested")
    if device.type != "cuda":
        return BackendChoice(requested, "sdpa", versions, f"{device.type}: banded block-diagonal SDPA")
    passed_over = []
    if requested == "auto":  # FA4 is probed (imported) only when FA3 cannot run
        for name in ("fa3", "fa4"):
            why = _status(name, device)
            if why == "ok":
                return BackendChoice(requested, name, versions, "; ".join(["fastest usable", *passed_over]))
            passed_over.append(f"{name}: {why}")
    why = _status("torch_varlen", device)
    if why != "ok":
        raise RuntimeError(f"model.attention_backend {requested!r}: no CUDA varlen kernels ({why})")
    return BackendChoice(requested, "torch_varlen", versions, "; ".join(passed_over) or "requested")


# --------------------------------------------------------------------------------------------------------------
# Backends. Shapes: q [T, H, D]; k, v [T, Hkv, D] with H % Hkv == 0; output [T, H, D].
# Query head h uses KV head h // (H // Hkv) (the FlashAttention / SDPA ``enable_gqa`` convention).
# --------------------------------------------------------------------------------------------------------------


def _repeat_kv(x: Tensor, num_heads: int) -> Tensor:
    """[T, Hkv, D] -> [T, H, D], each KV head repeated for its group of query heads."""
    group = num_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _fa3(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> Tensor:
    if _FA3_FN is None:
        raise RuntimeError(f"attention backend 'fa3' requested but unusable: {_FA3_WHY}")
    out = _FA3_FN(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)
    return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the log-sum-exp


def _fa4(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
         forward_kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    if _FA4 is None and not torch.compiler.is_compiling():
        probe_fa4()
    if _FA4 is None:  # (inside a compiled region nothing is probed: resolve_backend comes first)
        raise RuntimeError(f"attention backend 'fa4' requested but unusable: {_FA4_WHY}")
    return _FA4(q, k, v, cu_seqlens, max_seqlen, causal, forward_kv)


def _torch_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> Tensor:
    if _TORCH_VARLEN_FN is None:
        raise RuntimeError("attention backend 'torch_varlen' requested but torch.nn.attention.varlen is missing")
    keywords = _TORCH_VARLEN_KEYWORDS
    kwargs: dict = {}
    if "is_causal" in keywords:
        kwargs["is_causal"] = causal
    elif causal:
        kwargs["window_size"] = (-1, 0)  # torch 2.11/2.13: causal is a (left=-1, right=0) window
    if "enable_gqa" in keywords:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    else:  # torch 2.11 has no GQA: materialize the repeated KV heads
        k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    return _TORCH_VARLEN_FN(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> Tensor:
    """Banded block-diagonal attention with SDPA.

    Tokens are cut into ``n`` blocks of ``B = min(max_seqlen, T)``. Every segment is at most B long, so a
    query in block c only needs keys from blocks c-1 and c (and c+1 when not causal). Keys outside the
    query's segment (or in the future) are masked. Padding tokens at the end form their own segment so
    their rows are never empty (no NaN); they are dropped afterwards.
    """
    num_tokens, num_heads, head_dim = q.shape
    block = max(1, min(max_seqlen, num_tokens))
    num_blocks = math.ceil(num_tokens / block)
    pad = num_blocks * block - num_tokens
    k, v = _repeat_kv(k, num_heads), _repeat_kv(v, num_heads)  # [T, H, D]; works with every SDPA kernel
    seg = segment_ids(cu_seqlens, num_tokens)  # [T]
    pos = torch.arange(num_blocks * block, device=q.device)  # [n*B] global positions incl. padding
    if pad:
        q = F.pad(q, (0, 0, 0, 0, 0, pad))
        k = F.pad(k, (0, 0, 0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, 0, 0, pad))
        seg = torch.cat([seg, seg.new_full((pad,), -2)])  # -2: the padding's own segment
    # with a single block there are no neighbours to look at
    blocks_before = 1 if num_blocks > 1 else 0
    blocks_after = 1 if (num_blocks > 1 and not causal) else 0
    span = 1 + blocks_before + blocks_after  # key blocks per query block

    def windows(x: Tensor, fill) -> Tensor:
        # x [n*B, ...] -> [n, span*B, ...]: key blocks c-1 (if any), c, c+1 (if not causal) for query block c
        shape = x.shape[1:]
        before = torch.full((block * blocks_before, *shape), fill, dtype=x.dtype, device=x.device)
        after = torch.full((block * blocks_after, *shape), fill, dtype=x.dtype, device=x.device)
        padded = torch.cat([before, x, after])  # [(n + span - 1) * B, ...]
        parts = [padded[i * block : (i + num_blocks) * block].reshape(num_blocks, block, *shape) for i in range(span)]
        return torch.cat(parts, dim=1)

    k_win = windows(k, 0.0)  # [n, W, H, D], W = span * B
    v_win = windows(v, 0.0)
    seg_k = windows(seg, -1)  # [n, W]; -1 marks keys outside the row
    pos_k = windows(pos, -1)
    seg_q = seg.view(num_blocks, block)  # [n, B]
    pos_q = pos.view(num_blocks, block)
    mask = seg_q[:, :, None] == seg_k[:, None, :]  # [n, B, W]
    if causal:
        mask = mask & (pos_k[:, None, :] <= pos_q[:, :, None])
    y = F.scaled_dot_product_attention(
        q.view(num_blocks, block, num_heads, head_dim).transpose(1, 2),  # [n, H, B, D]
        k_win.transpose(1, 2),  # [n, H, W, D]
        v_win.transpose(1, 2),
        attn_mask=mask[:, None],  # [n, 1, B, W]
    )
    return y.transpose(1, 2).reshape(num_blocks * block, num_heads, head_dim)[:num_tokens]


_BACKEND_FNS = {"fa3": _fa3, "fa4": _fa4, "torch_varlen": _torch_varlen, "sdpa": _sdpa}


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    backend: Optional[str] = None,
    forward_kv: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """Within-segment attention over packed tokens; softmax scale 1/sqrt(D).

    q [T, H, D], k/v [T, Hkv, D], cu_seqlens int32 [n_segments + 1] -> [T, H, D].
    ``backend`` None picks ``select_backend(q.device)``. ``forward_kv`` (k, v [T, Hkv / r, D]) when k and v are
    heads repeated r times in a row (``train.repeat_kv_heads``): the same heads once, which FlashAttention 4's
    forward reads as native GQA (its faster forward; pgolf.model.flash4); the other backends ignore it. Segment
    values are validated on CPU in eager mode only (free there; on GPU it would cost a host sync per layer, and
    inside torch.compile a graph break).
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(
            f"attention: expected q [T, H, D], k/v [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"attention: k/v shapes {tuple(k.shape)}, {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if backend is None:
        backend = select_backend(q.device)
    if backend not in _BACKEND_FNS:
        raise ValueError(f"attention: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    if backend == "fa4" and forward_kv is not None:
        k_once, v_once = forward_kv
        if k_once.shape != v_once.shape or k_once.shape[0] != k.shape[0] or k.shape[1] % k_once.shape[1]:
            raise ValueError(f"attention: forward_kv shapes {tuple(k_once.shape)}, {tuple(v_once.shape)} are not k "
                             f"{tuple(k.shape)}'s heads once")
        return _fa4(q, k, v, cu_seqlens, max_seqlen, causal, forward_kv)
    return _BACKEND_FNS[backend](q, k, v, cu_seqlens, max_seqlen, causal)
