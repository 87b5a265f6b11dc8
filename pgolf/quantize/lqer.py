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

    ``a_codes``/``b_codes`` are bit-packed uint8. Scales are float16:
    - ``asym``: ``a_scales`` ``[1]`` (int2 levels -2..1), ``b_scales`` ``[rank, ceil(cols / group_size)]``.
    - ``sym``: ``a_scales`` ``[rank, ceil(rows / group_size)]`` (groups along ``A^T``), ``b_scales`` as above.
    """

    mode: str
    shape: tuple[int, int]
    rank: int
    group_size: int
    a_codes: torch.Tensor
    a_scales: torch.Tensor
    b_codes: torch.Tensor
    b_scales: torch.Tensor


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


def lqer_correction(E: torch.Tensor, rank: int, mode: str, group_size: int) -> LqerFactors:
    """Quantized rank-``rank`` SVD correction of the quantization error ``E = W - W_hat`` (``[rows, cols]``)."""
    _require_2d(E, "lqer_correction: E")
    if mode not in ("asym", "sym"):
        raise QuantizeError(f"lqer mode: expected 'asym' or 'sym', got {mode!r}")
    if rank < 1 or group_size < 1:
        raise QuantizeError(f"lqer: expected rank >= 1 and group_size >= 1, got rank={rank}, group_size={group_size}")
    rows, cols = E.shape
    r = min(rank, rows, cols)
    U, S, Vh = torch.linalg.svd(E.detach().double().cpu(), full_matrices=False)
    A = (U[:, :r] * S[:r]).float()  # [rows, r]
    B = Vh[:r].float()  # [r, cols]

    if mode == "asym":
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
    return LqerFactors(mode, (rows, cols), r, group_size, a_codes, a_scales, b_codes, b_scales)


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
    raise QuantizeError(f"lqer mode: expected 'asym' or 'sym', got {mode!r}")


def lqer_reconstruct(factors: LqerFactors) -> torch.Tensor:
    """``E_hat = A_hat @ B_hat`` as float32 ``[rows, cols]``."""
    rows, cols = factors.shape
    r, g = factors.rank, factors.group_size
    b_q = unpack_int4(factors.b_codes, r * cols).view(r, cols).to(torch.int16) - 8
    B_hat = _int4_group_dequantize(b_q, factors.b_scales, g)  # [r, cols]
    if factors.mode == "asym":
        a_q = unpack_int2(factors.a_codes, rows * r).view(rows, r).to(torch.int16) + INT2_LEVELS[0]
        A_hat = a_q.float() * factors.a_scales.float()  # [rows, r]
    elif factors.mode == "sym":
        a_q = unpack_int4(factors.a_codes, r * rows).view(r, rows).to(torch.int16) - 8
        A_hat = _int4_group_dequantize(a_q, factors.a_scales, g).T  # [rows, r]
    else:
        raise QuantizeError(f"lqer mode: expected 'asym' or 'sym', got {factors.mode!r}")
    return A_hat @ B_hat
