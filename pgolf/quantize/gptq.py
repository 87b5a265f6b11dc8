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

LQER (low-rank quantization error reconstruction): for the few tensors with the largest error keep a
rank-``r`` SVD of ``E = W - W_hat`` as ``A = U_r S_r`` (``[rows, r]``) and ``B = V_r^T`` (``[r, cols]``), itself
quantized very coarsely:

- mode ``"asym"`` (the record's codebook): float32 SVD; ``A`` is int2 with the ASYMMETRIC levels
  ``{-2, -1, 0, 1} * s`` and ONE float16 scale ``s = max|A| / 1.5`` for the whole matrix; ``B`` is int4
  ``[-8, 7]`` in groups of ``group_size`` consecutive columns, scale ``group max / 7.5``. When ``rank * cols``
  is not a multiple of the group, the record's fallback: int4 ``[-7, 7]`` with one scale per row of ``A`` and
  of ``B`` (layout ``rowsym``).
- mode ``"asym_search"`` (pgolf's): the same layout; the A scale is chosen by a small grid search and the sign
  of each rank component flipped so its largest-magnitude entry of ``A`` is negative and can use the lone
  ``-2`` level; ``B`` is int4 symmetric ``[-7, 7]``.
- mode ``"sym"``: both ``A^T`` and ``B`` are int4 symmetric ``[-7, 7]`` in groups of ``group_size`` along their
  long dimension (``A^T`` is ``[r, rows]``), one float16 scale per group.

Codes are bit-packed (``pack_int2``/``pack_int4``), little end first, into ``uint8``.
"""

from __future__ import annotations


import torch



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


def sdclip_scales(W: torch.Tensor, bits: int, clip_sigmas: float, correction: int = 1) -> torch.Tensor:
    """Per-row "SDClip" scales ``clip_sigmas * std(row) / max_level(bits)`` as float16 ``[rows]``.

    Clipping at a multiple of the row's standard deviation instead of its max ignores rare outliers, which buys
    resolution for the bulk of the weights. ``correction=1`` is the unbiased std (divides by ``cols - 1``, the
    record's; config ``sdclip_std: unbiased``), ``0`` the population std (``population``). float32 operations in
    the record's order: ``clip_sigmas * std`` first, then ``/ max_level``. A row with zero std (constant) falls
    back to ``max|w| / max_level`` so a constant row is still exact (the record gets scale 0 there); an all-zero
    row gets scale 1 (all codes 0).
    """
    _require_2d(W, "sdclip_scales: W")
    if clip_sigmas <= 0:
        raise QuantizeError(f"clip_sigmas: expected > 0, got {clip_sigmas}")
    qmax = max_level(bits)
    W32 = W.detach().float()
    std = W32.std(dim=1, correction=correction if W32.shape[1] > correction else 0)  # [rows]
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
    """Upper Cholesky factor ``U`` of ``H^-1`` (``[cols, cols]``) for an ALREADY damped ``H``.

    Rows of ``U`` give GPTQ both the per-column error denominators (``U[i, i]``) and how the error of column ``i``
    spreads over the columns after it (``U[i, i:]``). If ``H`` is not positive definite (a numerically
    rank-deficient calibration set), extra damping ``damp * mean(diag H)``, growing tenfold, is added up to four
    times before giving up (the record raises at once; a successful first attempt is unaffected).
    """
    cols = H.shape[0]
    mean_diag = float(H.diagonal().mean())
    if not mean_diag > 0:
        mean_diag = 1.0
    eye = torch.eye(cols, dtype=H.dtype, device=H.device)
    extra = tried = 0.0
    for attempt in range(5):
        tried = extra
        L, info = torch.linalg.cholesky_ex(H + extra * eye if extra else H)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        extra = max(extra * 10.0, max(damp, 1e-6) * mean_diag)
    raise QuantizeError(
        f"GPTQ: Hessian [{cols}, {cols}] is not positive definite even with extra damping {tried:.3g} "
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
    std_correction: int = 1,
    dead_columns: str = "keep",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with fixed per-row SDClip scales. Returns ``(q int8 [rows, cols], scale float16 [rows])``.

    Columns are quantized one at a time; the rounding error of each is pushed onto the columns not yet
    quantized, weighted by the inverse Hessian, which minimizes ``trace(D H D^T)`` greedily instead of ``||D||``.
    On the CPU in float32 the codes equal the record's ``gptq_quantize_weight`` bit for bit (same scales, same
    order of operations; tests/test_record_quant_oracle.py):

    - Scales come from the ORIGINAL ``W`` before any error feedback (``sdclip_scales``, ``std_correction``).
    - ``H`` is used as given (not symmetrized: Cholesky reads its lower triangle).
    - Dead columns (``diag H <= 0``: an input feature that never fires) get a diagonal of 1 (their row and column
      zeroed, a no-op for ``X^T X``). ``dead_columns="keep"``: their weights are rounded to nearest and receive
      no error feedback (a tied embedding uses the same matrix on its input side); ``"zero"`` (the record's):
      their codes are 0.
    - Damping ``damp * mean(diag H)``: a ``compute_dtype`` tensor operation on the unpermuted diagonal, added
      BEFORE the permutation (the last bits of ``H`` decide codes that sit on a rounding boundary).
    - ``act_order``: columns are processed in order of descending damped ``diag H`` (torch's default sort), the
      most important first, while the most columns remain to absorb their error; codes are un-permuted at the end.
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
    if dead_columns not in ("keep", "zero"):
        raise QuantizeError(f"dead_columns: expected 'keep' or 'zero', got {dead_columns!r}")
    qmax = max_level(bits)
    scale16 = sdclip_scales(W, bits, clip_sigmas, std_correction)  # [rows] float16
    device = W.device
    scale = scale16.to(device=device, dtype=compute_dtype)[:, None]  # [rows, 1]

    Wc = W.detach().to(compute_dtype).clone()  # [rows, cols], receives error feedback
    Hc = H.detach().to(device=device, dtype=compute_dtype).clone()  # [cols, cols]
    dead = torch.diag(Hc) <= 0  # [cols]
    if bool(dead.any()):
        Hc[dead, :] = 0
        Hc[:, dead] = 0
        Hc[dead, dead] = 1
        if dead_columns == "zero":
            Wc[:, dead] = 0
    if damp > 0:
        Hc.diagonal().add_(torch.diag(Hc).mean() * damp)  # a contiguous copy of the diagonal: the record's reduction

    if act_order:
        perm = torch.argsort(torch.diag(Hc), descending=True)  # [cols]
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
