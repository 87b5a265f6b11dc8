"""Post-training quantization: SDClip scales, GPTQ, LQER low-rank correction, and routing by parameter role.

Everything here is a pure function over tensors (CPU or CUDA). Nothing imports the model: the caller hands in a
plain state dict ``{name: tensor}``, the model's ``param_roles()`` mapping ``{name: role}`` and, for every tensor
that GPTQ quantizes, the Hessian proxy ``H = sum(x^T x) / batches`` of that matrix's input (``[cols, cols]``).

Integer ranges (one choice, used everywhere in pgolf):

- ``b``-bit weights are SYMMETRIC integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (int6: -31..31, int7: -63..63,
  int8: -127..127). The most negative code ``-2^(b-1)`` is never used, so ``q * scale`` is symmetric around zero
  and one per-row scale needs no zero point. Codes are stored one per ``int8`` byte; the compressor removes the
  unused high bits far better than bit-packing would let it model the values.
- Scales are stored as float16. Quantization always divides by the float16-rounded scale, so dequantizing from
  the stored artifact reproduces exactly the values GPTQ propagated its errors against.

LQER (low-rank quantization error reconstruction): for the few tensors with the largest output error keep a
rank-``r`` SVD of ``E = W - W_hat`` as ``A = U_r S_r`` (``[rows, r]``) and ``B = V_r^T`` (``[r, cols]``), itself
quantized very coarsely:

- mode ``"asym"`` (the record): ``A`` is int2 with the ASYMMETRIC levels ``{-2, -1, 0, 1} * s`` and ONE float16
  scale ``s`` for the whole matrix (chosen by a small grid search; the sign of each rank component is flipped so
  its largest-magnitude entry of ``A`` is negative and can use the lone ``-2`` level); ``B`` is int4 symmetric
  ``[-7, 7]`` in groups of ``group_size`` consecutive columns, one float16 scale per group.
- mode ``"sym"``: both ``A^T`` and ``B`` are int4 symmetric ``[-7, 7]`` in groups of ``group_size`` along their
  long dimension (``A^T`` is ``[r, rows]``), one float16 scale per group.

Codes are bit-packed (``pack_int2``/``pack_int4``), little end first, into ``uint8``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from pgolf.config import QuantizeConfig


class QuantizeError(ValueError):
    """Inputs to quantization are inconsistent (missing Hessian, wrong shape, unknown role, ...)."""


# Roles the model's ``param_roles()`` may return.
GPTQ_ROLES = ("attn", "mlp", "embedding", "head")
ROLES = GPTQ_ROLES + ("attn_gate", "gate", "scalar")

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24

INT2_LEVELS = (-2, 1)  # inclusive range of the asymmetric int2 codebook used for LQER's A
INT4_QMAX = 7  # LQER int4 is symmetric [-7, 7]


def max_level(bits: int) -> int:
    """Largest code of the symmetric ``bits``-bit range ``[-max_level, max_level]``."""
    if not 2 <= bits <= 8:
        raise QuantizeError(f"bits: expected 2..8 (codes are stored in int8), got {bits}")
    return 2 ** (bits - 1) - 1


def _to_fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales to float16, keeping them strictly positive and finite."""
    return scale.clamp(min=FP16_MIN_SUBNORMAL, max=FP16_MAX).to(torch.float16)


def _require_2d(W: torch.Tensor, what: str) -> None:
    if W.ndim != 2:
        raise QuantizeError(f"{what}: expected a 2-D matrix [rows, cols], got shape {tuple(W.shape)}")
    if not torch.is_floating_point(W):
        raise QuantizeError(f"{what}: expected a floating-point tensor, got {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        raise QuantizeError(f"{what}: contains NaN or Inf")


# --------------------------------------------------------------------------------------------------------------
# Scales, round-to-nearest, dequantization, output error
# --------------------------------------------------------------------------------------------------------------


def sdclip_scales(W: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """Per-row "SDClip" scales ``clip_sigmas * std(row) / max_level(bits)`` as float16 ``[rows]``.

    Clipping at a multiple of the row's standard deviation instead of its max ignores rare outliers, which buys
    resolution for the bulk of the weights. ``std`` is the population std (``correction=0``), so a 1-column row
    is defined. A row with zero std (constant) falls back to ``max|w| / max_level`` so a constant row is still
    exact; an all-zero row gets scale 1 (all codes 0).
    """
    _require_2d(W, "sdclip_scales: W")
    if clip_sigmas <= 0:
        raise QuantizeError(f"clip_sigmas: expected > 0, got {clip_sigmas}")
    qmax = max_level(bits)
    W32 = W.detach().float()
    std = W32.std(dim=1, correction=0)  # [rows]
    absmax = W32.abs().amax(dim=1)  # [rows]
    scale = clip_sigmas * std / qmax
    scale = torch.where(scale > 0, scale, absmax / qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _to_fp16_scale(scale)


def absmax_scales(W: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row ``max|w| / max_level(bits)`` as float16 ``[rows]`` (no clipping; zero rows get scale 1)."""
    _require_2d(W, "absmax_scales: W")
    absmax = W.detach().float().abs().amax(dim=1)  # [rows]
    scale = absmax / max_level(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _to_fp16_scale(scale)


def rtn_quantize(W: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest codes ``clamp(round(W / scale), -qmax, qmax)`` as int8 ``[rows, cols]``."""
    _require_2d(W, "rtn_quantize: W")
    if scale.shape != (W.shape[0],):
        raise QuantizeError(f"rtn_quantize: scale shape {tuple(scale.shape)} does not match W rows {W.shape[0]}")
    qmax = max_level(bits)
    s = scale.to(device=W.device, dtype=torch.float32)[:, None]  # [rows, 1]
    return torch.clamp(torch.round(W.detach().float() / s), -qmax, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale[:, None]`` (``[rows, cols]``), computed in float32 then cast to ``dtype``."""
    if q.ndim != 2 or scale.shape != (q.shape[0],):
        raise QuantizeError(f"dequantize: expected q [rows, cols] and scale [rows], got {tuple(q.shape)} and {tuple(scale.shape)}")
    return (q.float() * scale.to(device=q.device, dtype=torch.float32)[:, None]).to(dtype)


def layer_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``trace((W - W_hat) H (W - W_hat)^T)``: the squared output error ``||X (W - W_hat)^T||^2 / n``.

    This is the quantity GPTQ minimizes, so it (not the weight-space error) is what ranks tensors for LQER and
    what the report compares between RTN, GPTQ and GPTQ+LQER. Computed in float64.
    """
    D = (W.detach().double() - W_hat.detach().to(W.device).double())  # [rows, cols]
    Hd = H.detach().to(W.device).double()  # [cols, cols]
    if Hd.shape != (D.shape[1], D.shape[1]):
        raise QuantizeError(f"layer_output_error: H shape {tuple(Hd.shape)} does not match W cols {D.shape[1]}")
    return float(((D @ Hd) * D).sum())


# --------------------------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------------------------


def _inverse_hessian_upper_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``[cols, cols]``).

    Rows of ``U`` give GPTQ both the per-column error denominators (``U[i, i]``) and how the error of column ``i``
    spreads over the columns after it (``U[i, i:]``). If the damped matrix is still not positive definite
    (a numerically rank-deficient calibration set), damping grows tenfold, up to four times, before giving up.
    """
    cols = H.shape[0]
    mean_diag = float(H.diagonal().mean())
    if not mean_diag > 0:
        mean_diag = 1.0
    eye = torch.eye(cols, dtype=H.dtype, device=H.device)
    damp_value = damp * mean_diag if damp > 0 else 0.0
    for attempt in range(5):
        L, info = torch.linalg.cholesky_ex(H + damp_value * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp_value = max(damp_value * 10.0, 1e-6 * mean_diag)
    raise QuantizeError(
        f"GPTQ: Hessian [{cols}, {cols}] is not positive definite even with damping {damp_value:.3g} "
        "(check the calibration data: too few tokens or NaN activations?)"
    )


def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    clip_sigmas: float,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with fixed per-row SDClip scales. Returns ``(q int8 [rows, cols], scale float16 [rows])``.

    Columns are quantized one at a time; the rounding error of each is pushed onto the columns not yet
    quantized, weighted by the inverse Hessian, which minimizes ``trace(D H D^T)`` greedily instead of ``||D||``.

    - Scales come from the ORIGINAL ``W`` before any error feedback, so they are the same as RTN's.
    - Damping ``damp * mean(diag H)`` is added to the diagonal.
    - Dead columns (``diag H <= 0``: an input feature that is always zero) are decoupled (their row and column of
      ``H`` zeroed, diagonal set to 1): their weights are rounded to nearest and receive no error feedback. The
      weights are kept, not zeroed, because a tied embedding uses the same matrix on its input side.
    - ``act_order``: columns are processed in order of descending ``diag H`` (the most important first, while
      the most columns remain to absorb their error); the codes are un-permuted before returning.
    - Lazy batch updates: inside a block of ``block_size`` columns errors are applied column by column; the
      rest of the matrix is updated once per block with one matmul. The result equals the unblocked algorithm.
    """
    _require_2d(W, "gptq_quantize_weight: W")
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise QuantizeError(f"gptq_quantize_weight: Hessian shape {tuple(H.shape)}, expected [{cols}, {cols}] for W {tuple(W.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise QuantizeError("gptq_quantize_weight: Hessian contains NaN or Inf")
    if block_size < 1:
        raise QuantizeError(f"block_size: expected >= 1, got {block_size}")
    qmax = max_level(bits)
    scale16 = sdclip_scales(W, bits, clip_sigmas)  # [rows] float16
    device = W.device
    scale = scale16.to(device=device, dtype=compute_dtype)[:, None]  # [rows, 1]

    Wc = W.detach().to(compute_dtype).clone()  # [rows, cols], receives error feedback
    Hc = H.detach().to(device=device, dtype=compute_dtype).clone()  # [cols, cols]
    Hc = (Hc + Hc.T) / 2
    dead = Hc.diagonal() <= 0
    if bool(dead.any()):
        Hc[dead, :] = 0
        Hc[:, dead] = 0
        Hc[dead, dead] = 1

    if act_order:
        perm = torch.argsort(Hc.diagonal(), descending=True, stable=True)  # [cols]
        Wc = Wc[:, perm]
        Hc = Hc[perm][:, perm]
    U = _inverse_hessian_upper_cholesky(Hc, damp)  # [cols, cols] upper

    Q = torch.zeros(rows, cols, dtype=compute_dtype, device=device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wc[:, i1:i2].clone()  # [rows, b]
        U1 = U[i1:i2, i1:i2]  # [b, b]
        Err1 = torch.zeros_like(W1)  # [rows, b], scaled errors of this block
        for i in range(i2 - i1):
            w = W1[:, i : i + 1]  # [rows, 1]
            q = torch.clamp(torch.round(w / scale), -qmax, qmax)
            Q[:, i1 + i : i1 + i + 1] = q
            err = (w - q * scale) / U1[i, i]  # [rows, 1]
            W1[:, i:] -= err @ U1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        Wc[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of all later columns

    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8), scale16


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


# --------------------------------------------------------------------------------------------------------------
# Whole-model quantization
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One tensor of the quantized model.

    ``method``:
    - ``"gptq"`` / ``"rtn"``: ``q`` int8 ``[rows, cols]`` and ``scale`` float16 ``[rows]``; ``W_hat = q * scale``
      (plus ``lqer`` when present);
    - ``"fp16"``: ``data`` float16 with the original shape.
    """

    role: str
    method: str
    shape: tuple[int, ...]
    bits: int
    clip_sigmas: Optional[float] = None
    q: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    data: Optional[torch.Tensor] = None
    lqer: Optional[LqerFactors] = None


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """The quantized state plus what produced it.

    ``report`` (one dict per tensor, see :func:`quantize_state`) is diagnostics only: it is not stored in the
    packed artifact (it would cost bytes), so an unpacked model has an empty report.
    """

    tensors: dict[str, QuantizedTensor]
    quantize_config: dict
    report: list[dict] = dataclasses.field(default_factory=list)


def _route(name: str, role: str, numel: int, cfg: QuantizeConfig) -> tuple[str, int, Optional[float]]:
    """(method, bits, clip_sigmas) for one tensor, decided by role first, then by size.

    attn/mlp/embedding/head matrices are ALWAYS GPTQ-quantized whatever their size, so a tiny test model takes
    the same path as the record (whose smallest such matrix, 512x256, is above the passthrough limit anyway).
    """
    if role == "attn":
        return "gptq", cfg.attn_bits, cfg.attn_clip_sigmas
    if role == "mlp":
        return "gptq", cfg.mlp_bits, cfg.mlp_clip_sigmas
    if role in ("embedding", "head"):
        return "gptq", cfg.embed_bits, cfg.embed_clip_sigmas
    if role == "attn_gate":
        return "rtn", cfg.gate_bits, None
    if numel <= cfg.passthrough_max_elements:
        return "fp16", 16, None
    raise QuantizeError(
        f"{name}: role {role!r} with {numel:,} elements has no quantization route "
        f"(only tensors of <= passthrough_max_elements={cfg.passthrough_max_elements:,} elements are kept in fp16; "
        f"GPTQ roles are {', '.join(GPTQ_ROLES)})"
    )


def _relative(err: Optional[float], ref: float) -> Optional[float]:
    if err is None:
        return None
    return err / ref if ref > 0 else (0.0 if err == 0 else math.inf)


def _weight_rel_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    ref = float((W.double() ** 2).sum())
    err = float(((W.double() - W_hat.double()) ** 2).sum())
    return err / ref if ref > 0 else (0.0 if err == 0 else math.inf)


def quantize_state(
    state: dict[str, torch.Tensor],
    roles: dict[str, str],
    hessians: dict[str, torch.Tensor],
    cfg: QuantizeConfig,
) -> QuantizedModel:
    """Quantize a whole state dict, routing each tensor BY ROLE (never by name):

    ======================  ==================================================================
    role                    treatment
    ======================  ==================================================================
    attn                    GPTQ, ``attn_bits``, SDClip ``attn_clip_sigmas``
    mlp                     GPTQ, ``mlp_bits``, SDClip ``mlp_clip_sigmas``
    embedding, head         GPTQ, ``embed_bits``, SDClip ``embed_clip_sigmas``
    attn_gate               round-to-nearest, ``gate_bits``, per-row absmax scales
    gate, scalar            float16 if ``numel <= passthrough_max_elements``, else an error
    ======================  ==================================================================

    Then, unless ``lqer_mode == "off"``, the ``lqer_top_k`` GPTQ tensors with the largest absolute output error
    ``trace(D H D^T)`` get a rank-``lqer_rank`` LQER correction; it is kept only if it lowers that error.

    Every GPTQ tensor needs its Hessian ``[cols, cols]`` in ``hessians``. Computation runs on each weight's
    device; the stored results are on the CPU.

    ``report``: one dict per tensor (sorted by name) with ``name, role, shape, numel, method, bits, clip_sigmas,
    rtn_error, gptq_error, lqer_error, rtn_rel_error, gptq_rel_error, lqer_rel_error, weight_rel_error,
    lqer_applied``. Output errors are ``trace(D H D^T)``; relative ones divide by ``trace(W H W^T)``;
    ``weight_rel_error`` is ``||W - W_hat||^2 / ||W||^2`` of the final reconstruction. Errors that do not apply
    (no Hessian, no LQER) are ``None``.
    """
    missing_roles = sorted(set(state) - set(roles))
    extra_roles = sorted(set(roles) - set(state))
    if missing_roles or extra_roles:
        raise QuantizeError(
            "state and roles disagree: "
            + (f"no role for {', '.join(missing_roles)}" if missing_roles else "")
            + ("; " if missing_roles and extra_roles else "")
            + (f"roles for tensors not in the state: {', '.join(extra_roles)}" if extra_roles else "")
        )
    for name, role in roles.items():
        if role not in ROLES:
            raise QuantizeError(f"{name}: unknown role {role!r}; expected one of {', '.join(ROLES)}")

    tensors: dict[str, QuantizedTensor] = {}
    reports: dict[str, dict] = {}
    gptq_inputs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # name -> (W, W_hat, H)
    for name in sorted(state):
        W = state[name].detach()
        role = roles[name]
        if not torch.is_floating_point(W):
            raise QuantizeError(f"{name}: expected a floating-point tensor, got {W.dtype}")
        method, bits, clip = _route(name, role, W.numel(), cfg)
        report = {
            "name": name, "role": role, "shape": list(W.shape), "numel": W.numel(), "method": method,
            "bits": bits, "clip_sigmas": clip, "rtn_error": None, "gptq_error": None, "lqer_error": None,
            "rtn_rel_error": None, "gptq_rel_error": None, "lqer_rel_error": None, "weight_rel_error": None,
            "lqer_applied": False,
        }
        if method == "gptq":
            _require_2d(W, f"{name} (role {role!r})")
            if name not in hessians:
                raise QuantizeError(f"{name}: no Hessian given for this {role!r} matrix (GPTQ needs H [{W.shape[1]}, {W.shape[1]}])")
            H = hessians[name].to(W.device)
            if H.shape != (W.shape[1], W.shape[1]):
                raise QuantizeError(f"{name}: Hessian shape {tuple(H.shape)}, expected [{W.shape[1]}, {W.shape[1]}]")
            q, scale = gptq_quantize_weight(
                W, H, bits, clip, block_size=cfg.gptq_block_size, damp=cfg.gptq_damp, act_order=cfg.act_order
            )
            W_hat = dequantize(q, scale)
            ref = layer_output_error(W, torch.zeros_like(W), H)
            rtn_err = layer_output_error(W, dequantize(rtn_quantize(W, scale, bits), scale), H)
            gptq_err = layer_output_error(W, W_hat, H)
            report.update(
                rtn_error=rtn_err, gptq_error=gptq_err, rtn_rel_error=_relative(rtn_err, ref),
                gptq_rel_error=_relative(gptq_err, ref), weight_rel_error=_weight_rel_error(W, W_hat),
            )
            gptq_inputs[name] = (W, W_hat, H)
            tensors[name] = QuantizedTensor(role, method, tuple(W.shape), bits, clip, q=q.cpu(), scale=scale.cpu())
        elif method == "rtn":
            _require_2d(W, f"{name} (role {role!r})")
            scale = absmax_scales(W, bits)
            q = rtn_quantize(W, scale, bits)
            report.update(weight_rel_error=_weight_rel_error(W, dequantize(q, scale)))
            tensors[name] = QuantizedTensor(role, method, tuple(W.shape), bits, None, q=q.cpu(), scale=scale.cpu())
        else:
            data = W.to(torch.float16)
            if not bool(torch.isfinite(data).all()):
                raise QuantizeError(f"{name}: values overflow float16 (|w| > {FP16_MAX}) in fp16 passthrough")
            report.update(weight_rel_error=_weight_rel_error(W, data))
            tensors[name] = QuantizedTensor(role, method, tuple(W.shape), 16, None, data=data.cpu())
        reports[name] = report

    if cfg.lqer_mode != "off" and cfg.lqer_top_k > 0:
        ranked = sorted(gptq_inputs, key=lambda n: (-reports[n]["gptq_error"], n))[: cfg.lqer_top_k]
        for name in ranked:
            W, W_hat, H = gptq_inputs[name]
            factors = lqer_correction(W.float() - W_hat, cfg.lqer_rank, cfg.lqer_mode, cfg.lqer_group_size)
            corrected = W_hat + lqer_reconstruct(factors).to(W_hat.device)
            err = layer_output_error(W, corrected, H)
            ref = layer_output_error(W, torch.zeros_like(W), H)
            report = reports[name]
            report.update(lqer_error=err, lqer_rel_error=_relative(err, ref))
            if err < report["gptq_error"]:
                report.update(lqer_applied=True, weight_rel_error=_weight_rel_error(W, corrected))
                tensors[name] = dataclasses.replace(tensors[name], lqer=factors)

    return QuantizedModel(tensors, dataclasses.asdict(cfg), [reports[n] for n in sorted(reports)])


def dequantize_tensor(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct one tensor: ``q * scale (+ LQER)`` or the fp16 passthrough, as ``dtype``."""
    if qt.method in ("gptq", "rtn"):
        assert qt.q is not None and qt.scale is not None
        W_hat = dequantize(qt.q, qt.scale)
        if qt.lqer is not None:
            W_hat = W_hat + lqer_reconstruct(qt.lqer)
        return W_hat.to(dtype)
    if qt.method == "fp16":
        assert qt.data is not None
        return qt.data.to(dtype)
    raise QuantizeError(f"unknown quantization method {qt.method!r}")


def dequantize_state(qm: QuantizedModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state dict the model loads for evaluation (float32 by default, or e.g. bfloat16)."""
    return {name: dequantize_tensor(qt, dtype) for name, qt in sorted(qm.tensors.items())}
