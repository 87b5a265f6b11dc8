"""Quantize a model's weights as a whole: route each tensor by its role (int6 GPTQ for attention and MLP matrices,
int7 for the embedding, int8 per row for the attention gate, fp16 for small tensors), then LQER corrections on the
tensors with the largest output error; and the inverse, dequantization."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from pgolf.config import QuantizeConfig
from pgolf.io import Countdown


from pgolf.quantize.gptq import (
    FP16_MAX,
    GPTQ_ROLES,
    ROLES,
    QuantizeError,
    _require_2d,
    absmax_scales,
    dequantize,
    gptq_quantize_weight,
    layer_output_error,
    rtn_quantize,
)
from pgolf.quantize.lqer import LqerFactors, lqer_correction, lqer_reconstruct


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
    """(method, bits, clip_sigmas) for one tensor.

    In order: an attention gate inside the element window ``gate_min_elements..gate_max_elements`` is int8 per
    row; with ``small_matrix_passthrough`` (the record's) any tensor of <= ``passthrough_max_elements`` stays
    fp16; attn/mlp/embedding/head matrices are GPTQ-quantized (without ``small_matrix_passthrough``, whatever
    their size, so a tiny test model takes the GPTQ path); other small tensors stay fp16.
    """
    upper = cfg.gate_max_elements
    if role == "attn_gate" and cfg.gate_min_elements <= numel and (upper is None or numel <= upper):
        return "rtn", cfg.gate_bits, None
    small = numel <= cfg.passthrough_max_elements
    if small and cfg.small_matrix_passthrough:
        return "fp16", 16, None
    if role == "attn":
        return "gptq", cfg.attn_bits, cfg.attn_clip_sigmas
    if role == "mlp":
        return "gptq", cfg.mlp_bits, cfg.mlp_clip_sigmas
    if role in ("embedding", "head"):
        return "gptq", cfg.embed_bits, cfg.embed_clip_sigmas
    if small:
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
    hessians_source: str = "",
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

    Routing details (gate window, ``small_matrix_passthrough``): :func:`_route`. Then, unless
    ``lqer_mode == "off"``, the ``lqer_top_k`` GPTQ tensors with the largest error (``lqer_rank_by``: output
    error ``trace(D H D^T)``, or the record's ``||W - W_hat||_F``; ties by name) get a rank-``lqer_rank`` LQER
    correction; with ``lqer_keep_if_better`` it is kept only if it lowers the output error, else always (the
    record's).

    Every GPTQ tensor needs its Hessian ``[cols, cols]`` in ``hessians``; an error about one starts with
    ``hessians_source`` (the file it was read from) when given. Computation runs on each weight's device; the
    stored results are on the CPU.

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
    countdown = Countdown("tensor", len(state))
    for done, name in enumerate(sorted(state), start=1):
        countdown.update(done, name)
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
            where = f"{hessians_source}: {name}" if hessians_source else name
            if name not in hessians:
                raise QuantizeError(f"{where}: no Hessian given for this {role!r} matrix "
                                    f"(GPTQ needs H [{W.shape[1]}, {W.shape[1]}])")
            H = hessians[name].to(W.device)
            if H.shape != (W.shape[1], W.shape[1]):
                raise QuantizeError(f"{where}: Hessian shape {tuple(H.shape)}, expected [{W.shape[1]}, {W.shape[1]}]")
            try:  # the matrix's name in the error: which Hessian of the file is not positive definite
                q, scale = gptq_quantize_weight(
                    W, H, bits, clip, block_size=cfg.gptq_block_size, damp=cfg.gptq_damp, act_order=cfg.act_order,
                    std_correction=1 if cfg.sdclip_std == "unbiased" else 0, dead_columns=cfg.gptq_dead_columns,
                )
            except QuantizeError as exc:
                raise QuantizeError(f"{where}: {exc}") from None
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
        if cfg.lqer_rank_by == "weight_fro":  # the record's: ||W - W_hat||_F in float32
            score = {n: float((W.float() - W_hat).norm()) for n, (W, W_hat, _) in gptq_inputs.items()}
        else:
            score = {n: reports[n]["gptq_error"] for n in gptq_inputs}
        for name in sorted(gptq_inputs, key=lambda n: (-score[n], n))[: cfg.lqer_top_k]:
            W, W_hat, H = gptq_inputs[name]
            try:
                factors = lqer_correction(W.float() - W_hat, cfg.lqer_rank, cfg.lqer_mode, cfg.lqer_group_size)
            except QuantizeError as exc:
                raise QuantizeError(f"{name}: {exc}") from None
            corrected = W_hat + lqer_reconstruct(factors).to(W_hat.device)
            err = layer_output_error(W, corrected, H)
            ref = layer_output_error(W, torch.zeros_like(W), H)
            report = reports[name]
            report.update(lqer_error=err, lqer_rel_error=_relative(err, ref))
            if err < report["gptq_error"] or not cfg.lqer_keep_if_better:
                report.update(lqer_applied=True, weight_rel_error=_weight_rel_error(W, corrected))
                tensors[name] = dataclasses.replace(tensors[name], lqer=factors)

    return QuantizedModel(tensors, dataclasses.asdict(cfg), [reports[n] for n in sorted(reports)])


def dequantize_tensor(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct one tensor: ``q * scale (+ LQER)`` in float32, or the fp16 passthrough, as ``dtype``."""
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
    """The state dict the model loads for evaluation (float32 by default, or e.g. bfloat16).

    With ``dequant_embed_dtype: bfloat16`` in the model's quantize config (the record's: its evaluation model
    holds ``tok_emb`` in bf16), the embedding (role ``embedding``) is rounded through bf16 once, then cast to
    ``dtype``; an artifact without the key (older pgolf) is not rounded.
    """
    embed = getattr(torch, qm.quantize_config.get("dequant_embed_dtype", "float32"))
    out = {}
    for name, qt in sorted(qm.tensors.items()):
        rounded = embed if qt.role == "embedding" and embed != torch.float32 else None
        out[name] = dequantize_tensor(qt, rounded).to(dtype) if rounded else dequantize_tensor(qt, dtype)
    return out
