"""LQER: a low-rank correction of the quantization error ``E = W - Q`` (rank-r SVD factors, stored quantized),
and the bit packing of its small integer codes."""

from __future__ import annotations

import dataclasses
import math

import torch



from pgolf.quantize.gptq import INT2_LEVELS, INT4_QMAX, QuantizeError, _require_2d, _to_fp16_scale


# --------------------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------------------


def _pack_codes(codes: torch.Tensor, bits_per_code: int) -> torch.Tensor:
    per_byte = 8 // bits_per_code
    limit = 1 << bits_per_code
    flat = codes.reshape(-1)
    if flat.dtype.is_floating_point or flat.dtype == torch.bool:
        raise QuantizeError(f"pack_int{bits_per_code}: expected integer codes, got {flat.dtype}")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= limit):
        raise QuantizeError(
            f"pack_int{bits_per_code}: codes must lie in [0, {limit - 1}], got [{int(flat.min())}, {int(flat.max())}]"
        )
    flat = flat.to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8, device=flat.device)])
    groups = flat.view(-1, per_byte)  # [nbytes, per_byte]
    packed = torch.zeros(groups.shape[0], dtype=torch.uint8, device=flat.device)
    for j in range(per_byte):
        packed |= groups[:, j] << (bits_per_code * j)
    return packed


def _unpack_codes(packed: torch.Tensor, numel: int, bits_per_code: int) -> torch.Tensor:
    per_byte = 8 // bits_per_code
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise QuantizeError(f"unpack_int{bits_per_code}: expected 1-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != math.ceil(numel / per_byte):
        raise QuantizeError(
            f"unpack_int{bits_per_code}: {packed.numel()} bytes cannot hold exactly {numel} codes "
            f"(expected {math.ceil(numel / per_byte)} bytes)"
        )
    mask = (1 << bits_per_code) - 1
    parts = [(packed >> (bits_per_code * j)) & mask for j in range(per_byte)]
    return torch.stack(parts, dim=1).reshape(-1)[:numel]


def pack_int2(codes: torch.Tensor) -> torch.Tensor:
    """Codes in ``[0, 3]`` (any shape, flattened) -> uint8 ``[ceil(n / 4)]``; code ``k`` sits in bits ``2k % 8``."""
    return _pack_codes(codes, 2)


def unpack_int2(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int2`: uint8 codes ``[numel]``."""
    return _unpack_codes(packed, numel, 2)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in ``[0, 15]`` (any shape, flattened) -> uint8 ``[ceil(n / 2)]``; even index in the low nibble."""
    return _pack_codes(codes, 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 codes ``[numel]``."""
    return _unpack_codes(packed, numel, 4)


# --------------------------------------------------------------------------------------------------------------
# LQER
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LqerFactors:
    """A quantized rank-``rank`` correction ``E_hat = A_hat @ B_hat`` for a ``shape = (rows, cols)`` matrix.

    ``mode`` is the STORED LAYOUT (both asym encoders, the record's and pgolf's search, write ``asym``).
    ``a_codes``/``b_codes`` are bit-packed uint8. Scales are float16:
    - ``asym``: ``a_scales`` ``[1]`` (int2 levels -2..1), ``b_scales`` ``[rank, ceil(cols / group_size)]``.
    - ``sym``: ``a_scales`` ``[rank, ceil(rows / group_size)]`` (groups along ``A^T``), ``b_scales`` as above.
    - ``rowsym`` (the record's fallback): int4 [-7, 7] codes of ``A [rows, rank]`` and ``B [rank, cols]``,
      ``a_scales`` ``[rows]`` (one per row of A), ``b_scales`` ``[rank]`` (one per row of B).
    """

    mode: str
    shape: tuple[int, int]
    rank: int
    group_size: int
    a_codes: torch.Tensor
    a_scales: torch.Tensor
    b_codes: torch.Tensor
    b_scales: torch.Tensor


LQER_MODES = ("asym", "asym_search", "sym")  # encoders (config lqer_mode)
LQER_LAYOUTS = ("asym", "sym", "rowsym")  # what an artifact stores


def _int4_group_quantize(M: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 ``[-7, 7]`` of ``M [r, n]`` in groups of ``group_size`` along ``n``.

    Returns ``(q int8 [r, n], scales float16 [r, ceil(n / group_size)])``; scale = group absmax / 7.
    """
    r, n = M.shape
    groups = math.ceil(n / group_size)
    padded = torch.zeros(r, groups * group_size, dtype=torch.float32, device=M.device)
    padded[:, :n] = M.float()
    grouped = padded.view(r, groups, group_size)  # [r, groups, group_size]
    absmax = grouped.abs().amax(dim=2)  # [r, groups]
    scales16 = _to_fp16_scale(torch.where(absmax > 0, absmax / INT4_QMAX, torch.ones_like(absmax)))
    q = torch.clamp(torch.round(grouped / scales16.float()[:, :, None]), -INT4_QMAX, INT4_QMAX)
    return q.view(r, -1)[:, :n].to(torch.int8), scales16


def _int4_group_dequantize(q: torch.Tensor, scales16: torch.Tensor, group_size: int) -> torch.Tensor:
    r, n = q.shape
    s = scales16.float().repeat_interleave(group_size, dim=1)[:, :n]  # [r, n]
    return q.float() * s


def _int2_asym_quantize(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [rows, r]`` -> (codes int8 in [-2, 1], one float16 scale ``[1]``) minimizing ``||A - s q||_F``.

    The scale is picked from a fixed grid of fractions of ``max|A| / 2`` (deterministic, no randomness).
    """
    lo, hi = INT2_LEVELS
    absmax = float(A.abs().max()) if A.numel() else 0.0
    if absmax == 0.0:
        return torch.zeros_like(A, dtype=torch.int8), torch.ones(1, dtype=torch.float16)
    best_err, best_q, best_s16 = math.inf, torch.zeros_like(A, dtype=torch.int8), torch.ones(1, dtype=torch.float16)
    for fraction in torch.linspace(0.1, 1.0, 46).tolist():
        s16 = _to_fp16_scale(torch.tensor([absmax / -lo * fraction]))
        s = float(s16)
        q = torch.clamp(torch.round(A / s), lo, hi)
        err = float(((A - q * s) ** 2).sum())
        if err < best_err:
            best_err, best_q, best_s16 = err, q.to(torch.int8), s16
    return best_q, best_s16


def _record_asym(A: torch.Tensor, B: torch.Tensor, g: int) -> tuple[torch.Tensor, ...]:
    """The record's codebook: A int2 [-2, 1] with ONE scale ``max|A| / 1.5`` (its largest entry maps to -2 or to
    the clamped +1); B int4 [-8, 7] per group of ``g`` consecutive entries, scale ``group max / 7.5``."""
    a_s = (A.abs().amax().clamp_min(1e-10) / 1.5).to(torch.float16).reshape(1)
    a_q = torch.clamp(torch.round(A / a_s.float()), -2, 1)
    groups = B.reshape(B.shape[0], -1, g)  # [r, cols / g, g]
    b_s = (groups.abs().amax(dim=2).clamp_min(1e-10) / 7.5).to(torch.float16)  # [r, cols / g]
    b_q = torch.clamp(torch.round(groups / b_s.float()[:, :, None]), -8, 7).reshape(B.shape)
    return a_q, a_s, b_q, b_s


def _row_int4(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 [-7, 7] with one float16 scale per row, ``row max / 7`` (the record's fallback for A and B)."""
    s = (M.abs().amax(dim=1).clamp_min(1e-10) / INT4_QMAX).to(torch.float16)  # [n]
    return torch.clamp(torch.round(M / s.float()[:, None]), -INT4_QMAX, INT4_QMAX), s


def _require_finite_scales(*scales16: torch.Tensor) -> None:
    """The record's codebook casts its scales to float16 without clamping (kept: the record recipe's factors are
    its factors bit for bit); a scale past float16's range would be inf and dequantize the layer to NaN."""
    for s in scales16:
        if not bool(torch.isfinite(s).all()):
            raise QuantizeError(
                f"lqer_mode asym: a factor scale is {float(s.float().abs().max())} in float16 (its largest finite value "
                "is 65504): the quantization error is too large for the record's codebook; use lqer_mode asym_search")


def lqer_correction(E: torch.Tensor, rank: int, mode: str, group_size: int) -> LqerFactors:
    """Quantized rank-``rank`` SVD correction of the quantization error ``E = W - W_hat`` (``[rows, cols]``).

    ``mode`` (see the module docstring and ``QuantizeConfig.lqer_mode``):
    - ``asym``: the record's (float32 SVD on the CPU, LAPACK's signs, :func:`_record_asym`; equal to its factors
      bit for bit). When ``rank * cols`` is not a multiple of ``group_size`` the record falls back to per-row int4
      factors: layout ``rowsym``. ``cols`` not a multiple of ``group_size`` while ``rank * cols`` is would make the
      record's groups straddle rows of B, which no layout stores: refused.
    - ``asym_search``: pgolf's (float64 SVD, each component's sign flipped so its largest-|A| entry is negative,
      grid-searched A scale, B int4 [-7, 7] per group of columns); layout ``asym``.
    - ``sym``: int4 [-7, 7] groups along A^T and B; layout ``sym``.
    """
    _require_2d(E, "lqer_correction: E")
    if mode not in LQER_MODES:
        raise QuantizeError(f"lqer mode: expected one of {', '.join(LQER_MODES)}, got {mode!r}")
    if rank < 1 or group_size < 1:
        raise QuantizeError(f"lqer: expected rank >= 1 and group_size >= 1, got rank={rank}, group_size={group_size}")
    rows, cols = E.shape
    r = min(rank, rows, cols)
    if mode == "asym":
        U, S, Vh = torch.linalg.svd(E.detach().float().cpu(), full_matrices=False)
        A = U[:, :r] * S[:r]  # [rows, r]
        B = Vh[:r]  # [r, cols]
        if (r * cols) % group_size:
            a_q, a_s = _row_int4(A)
            b_q, b_s = _row_int4(B)
            _require_finite_scales(a_s, b_s)
            return LqerFactors("rowsym", (rows, cols), r, group_size, pack_int4((a_q.to(torch.int16) + 8).reshape(-1)),
                               a_s, pack_int4((b_q.to(torch.int16) + 8).reshape(-1)), b_s)
        if cols % group_size:
            raise QuantizeError(
                f"lqer_mode asym: cols {cols} is not a multiple of lqer_group_size {group_size}; the record groups the "
                "flattened B, which this layout does not store; use a model_dim multiple of the group or lqer_mode asym_search"
            )
        a_q, a_scales, b_q, b_scales = _record_asym(A, B, group_size)
        _require_finite_scales(a_scales, b_scales)
        a_codes = pack_int2((a_q.to(torch.int16) - INT2_LEVELS[0]).reshape(-1))
        b_codes = pack_int4((b_q.to(torch.int16) + 8).reshape(-1))
        return LqerFactors("asym", (rows, cols), r, group_size, a_codes, a_scales, b_codes, b_scales)

    U, S, Vh = torch.linalg.svd(E.detach().double().cpu(), full_matrices=False)
    A = (U[:, :r] * S[:r]).float()  # [rows, r]
    B = Vh[:r].float()  # [r, cols]
    if mode == "asym_search":
        # A @ B is unchanged by flipping the sign of a column of A and the matching row of B; make each
        # column's largest-magnitude entry negative so it can use the lone -2 level.
        peak = A.gather(0, A.abs().argmax(dim=0, keepdim=True))  # [1, r]
        sign = torch.where(peak > 0, -1.0, 1.0)  # [1, r]
        A = A * sign
        B = B * sign.T
        a_q, a_scales = _int2_asym_quantize(A)  # [rows, r] in [-2, 1], [1]
        a_codes = pack_int2((a_q.to(torch.int16) - INT2_LEVELS[0]).reshape(-1))
    else:
        a_q, a_scales = _int4_group_quantize(A.T.contiguous(), group_size)  # [r, rows], [r, groups]
        a_codes = pack_int4((a_q.to(torch.int16) + 8).reshape(-1))
    b_q, b_scales = _int4_group_quantize(B, group_size)  # [r, cols], [r, groups]
    b_codes = pack_int4((b_q.to(torch.int16) + 8).reshape(-1))
    layout = "asym" if mode == "asym_search" else "sym"
    return LqerFactors(layout, (rows, cols), r, group_size, a_codes, a_scales, b_codes, b_scales)


def lqer_factor_shapes(mode: str, shape: tuple[int, int], rank: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the four stored tensors of an :class:`LqerFactors` (used by the artifact reader to validate)."""
    rows, cols = shape
    b_groups = math.ceil(cols / group_size)
    if mode == "asym":
        return {
            "a_codes": (math.ceil(rows * rank / 4),),
            "a_scales": (1,),
            "b_codes": (math.ceil(rank * cols / 2),),
            "b_scales": (rank, b_groups),
        }
    if mode == "sym":
        return {
            "a_codes": (math.ceil(rank * rows / 2),),
            "a_scales": (rank, math.ceil(rows / group_size)),
            "b_codes": (math.ceil(rank * cols / 2),),
            "b_scales": (rank, b_groups),
        }
    if mode == "rowsym":
        return {
            "a_codes": (math.ceil(rows * rank / 2),),
            "a_scales": (rows,),
            "b_codes": (math.ceil(rank * cols / 2),),
            "b_scales": (rank,),
        }
    raise QuantizeError(f"lqer layout: expected one of {', '.join(LQER_LAYOUTS)}, got {mode!r}")


def lqer_reconstruct(factors: LqerFactors) -> torch.Tensor:
    """``E_hat = A_hat @ B_hat`` as float32 ``[rows, cols]``."""
    rows, cols = factors.shape
    r, g = factors.rank, factors.group_size
    b_q = unpack_int4(factors.b_codes, r * cols).view(r, cols).to(torch.int16) - 8
    if factors.mode == "rowsym":
        a_q = unpack_int4(factors.a_codes, rows * r).view(rows, r).to(torch.int16) - 8
        A_hat = a_q.float() * factors.a_scales.float()[:, None]  # [rows, r]
        return A_hat @ (b_q.float() * factors.b_scales.float()[:, None])
    B_hat = _int4_group_dequantize(b_q, factors.b_scales, g)  # [r, cols]
    if factors.mode == "asym":
        a_q = unpack_int2(factors.a_codes, rows * r).view(rows, r).to(torch.int16) + INT2_LEVELS[0]
        A_hat = a_q.float() * factors.a_scales.float()  # [rows, r]
    elif factors.mode == "sym":
        a_q = unpack_int4(factors.a_codes, r * rows).view(r, rows).to(torch.int16) - 8
        A_hat = _int4_group_dequantize(a_q, factors.a_scales, g).T  # [rows, r]
    else:
        raise QuantizeError(f"lqer layout: expected one of {', '.join(LQER_LAYOUTS)}, got {factors.mode!r}")
    return A_hat @ B_hat
