"""The model's two sublayers, attention and MLP, and the small functions they and the blocks share.

``Attention``: GQA self-attention with q/k RMSNorm, partial RoPE, a per-head q gain, XSA and an output gate, with
separate q, k, v, o Linear modules (Hessian hooks and LoRA wrappers find them by name); ``MLP``: ``down(act(up(x)))``.
Both take optional fused paths, attached as runtime state (pgolf.model.attn_kernels, pgolf.model.kernels) and taken
only while the modules they bypass are plain (:func:`plain_linear`). ``pgolf.model.gpt`` builds blocks from them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pgolf.config import ModelConfig
from pgolf.model import kernels
from pgolf.model.attention import attention
from pgolf.model.rope import apply_partial_rope


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm over the last dim, no weight; returns x's dtype. Why the cast: torch >= 2.12 puts ``rms_norm`` on
    CUDA autocast's fp32 list, which would widen a bf16 residual stream (and everything saved from it) to fp32;
    torch 2.11, which the record ran, keeps the input dtype. For fp32 x the cast is the identity."""
    return F.rms_norm(x, (x.shape[-1],)).to(x.dtype)


def mlp_activation(x: Tensor, kind: str, slope: float) -> Tensor:
    """``leaky_relu(x, slope)^2`` or ``relu(x)^2``: squared activations train better than GELU at this size."""
    if kind == "leaky_relu_sq":
        return F.leaky_relu(x, slope).square()
    if kind == "relu_sq":
        return F.relu(x).square()
    raise ValueError(f"mlp_activation: unknown kind {kind!r}")


def _linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


def plain_linear(m: nn.Module) -> bool:
    """A bias-free nn.Linear with no forward hooks: code may then use its weight without calling it. A Hessian hook
    or a LoRA wrapper must see every call, so either makes this False."""
    return type(m) is nn.Linear and m.bias is None and not (m._forward_hooks or m._forward_pre_hooks)


def row_scaled(weight: Tensor, scale: Tensor) -> Tensor:
    """``diag(scale) @ weight``: W [out, in], scale [out]. ``F.linear(x, row_scaled(W, s)) == s * F.linear(x, W)``:
    the per-channel output scale of a sublayer folded into its last projection (``Block.fold_output_scales``)."""
    return weight * scale.to(weight.dtype)[:, None]


class Attention(nn.Module):
    """GQA self-attention with q/k RMSNorm, partial RoPE, per-head q gain, XSA and an output gate.

    Separate bias-free ``q``, ``k``, ``v``, ``o`` Linear modules so later stages can hook them by name.
    """

    def __init__(self, cfg: ModelConfig, use_xsa: bool):
        super().__init__()
        d, h, hkv, hd = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.qk_norm = cfg.qk_norm
        self.use_xsa = use_xsa
        self.q = _linear(d, h * hd)
        self.k = _linear(d, hkv * hd)
        self.v = _linear(d, hkv * hd)
        self.o = _linear(h * hd, d)
        self.q_gain = nn.Parameter(torch.full((h,), cfg.q_gain_init)) if cfg.q_gain_init > 0 else None
        self.gate_kind = cfg.attn_gate
        self.gate_scale = cfg.attn_gate_scale
        self.gate_window = cfg.attn_gate_window if cfg.attn_gate == "sparse" else d
        self.gate = _linear(self.gate_window, h) if cfg.attn_gate != "none" else None  # W [H, window]
        # runtime state, set by pgolf.model.attn_kernels.use_in_model: the fused q/k and XSA + gate kernels, the
        # q/k kernels on the output of one q, k, v matmul, and how many copies of each k / v head that path hands
        # the attention kernel (1: native GQA; H / Hkv: none, train.repeat_kv_heads)
        self.qk_kernel: Optional[Callable] = None
        self.xsa_gate_kernel: Optional[Callable] = None
        self.gate_kernel: Optional[Callable] = None  # the gate's projection: attn_kernels.gate_linear (train.fused_gate_linear)
        self.qkv_kernel: Optional[Callable] = None
        self.kv_repeat = 1

    def param_roles(self) -> dict[str, str]:
        roles = {f"{name}.weight": "attn" for name in ("q", "k", "v", "o")}
        if self.q_gain is not None:
            roles["q_gain"] = "scalar"
        if self.gate is not None:
            roles["gate.weight"] = "attn_gate"
        return roles

    def forward(
        self,
        x: Tensor,  # [T, d], already normalized
        rope: Optional[tuple[Tensor, Tensor]],
        cu_seqlens: Tensor,
        max_seqlen: int,
        backend: Optional[str],
        out_scale: Optional[Tensor] = None,
    ) -> Tensor:
        """[T, d] -> [T, d]; ``out_scale`` [d]: the output multiplied by it, folded into ``o``'s weight (the caller
        checks that ``o`` is a :func:`plain_linear`)."""
        T = x.shape[0]
        if (self.qkv_kernel is not None and self.qk_norm and rope is not None
                and plain_linear(self.q) and plain_linear(self.k) and plain_linear(self.v)):
            # one matmul for q, k and v ([(H + 2 Hkv) D, d] stacked weights) and the q/k kernels on its product
            # (on Hopper one kernel: the q/k kernels as the matmul's epilogue); k, v_attn [T, Hkv r, D] (r =
            # kv_repeat copies of each head), v [T, Hkv, D] for XSA
            w_qkv = torch.cat([self.q.weight, self.k.weight, self.v.weight])
            q, k, v, v_attn = self.qkv_kernel(x, w_qkv, self.num_heads, self.num_kv_heads, *rope, self.q_gain,
                                              self.kv_repeat)
            return self._attend(x, q, k, v, cu_seqlens, max_seqlen, backend, out_scale, v_attn)
        q = self.q(x).view(T, self.num_heads, self.head_dim)  # [T, H, D]
        k = self.k(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.qk_kernel is not None and self.qk_norm and rope is not None:  # one kernel each for q and k
            q, k = self.qk_kernel(q, *rope, self.q_gain), self.qk_kernel(k, *rope, None)  # gain cast to q.dtype
        else:
            if self.qk_norm:
                q, k = rms_norm(q), rms_norm(k)
            if rope is not None:
                q, k = apply_partial_rope(q, *rope), apply_partial_rope(k, *rope)
            if self.q_gain is not None:
                q = q * self.q_gain.to(q.dtype)[None, :, None]
        return self._attend(x, q, k, v, cu_seqlens, max_seqlen, backend, out_scale)

    def _gate_input(self, x: Tensor) -> Tensor:
        """The output gate's pre-activation [T, H] from the first ``gate_window`` channels of x [T, d]; through the
        module itself where a hook or wrapper must see the call."""
        window = x[:, : self.gate_window]
        if self.gate_kernel is not None and plain_linear(self.gate):
            return self.gate_kernel(window, self.gate.weight)
        return self.gate(window)

    def _attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                backend: Optional[str], out_scale: Optional[Tensor], v_attn: Optional[Tensor] = None) -> Tensor:
        """Attention over prepared q [T, H, D], k [T, Hkv r, D] and ``v_attn`` (v when None) [T, Hkv r, D], then
        XSA (with v [T, Hkv, D]), the gate and the output projection."""
        T = x.shape[0]
        q, k = q.to(v.dtype), k.to(v.dtype)
        forward_kv = None
        if v_attn is not None and self.kv_repeat > 1:  # each k / v head once too: FA4's forward reads them as GQA
            forward_kv = (k.view(T, self.num_kv_heads, self.kv_repeat, self.head_dim)[:, :, 0], v)
        y = attention(q, k, v if v_attn is None else v_attn, cu_seqlens, max_seqlen, causal=True,
                      backend=backend, forward_kv=forward_kv)  # [T, H, D]
        if self.xsa_gate_kernel is not None and (self.use_xsa or self.gate is not None):  # one kernel for both
            z = self._gate_input(x) if self.gate is not None else None  # [T, H] pre-activation
            y = self.xsa_gate_kernel(y, v if self.use_xsa else None, z, self.gate_scale)
        else:
            if self.use_xsa:
                y = exclusive_self_attention(y, v)
            if self.gate is not None:
                g = torch.sigmoid(self.gate_scale * self._gate_input(x))  # [T, H]
                y = y * g.to(y.dtype)[:, :, None]
        y = y.reshape(T, self.num_heads * self.head_dim)
        return self.o(y) if out_scale is None else F.linear(y, row_scaled(self.o.weight, out_scale))


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along the token's OWN normalized value vector.

    y [T, H, D], v [T, Hkv, D]; query heads are grouped per KV head (head h -> KV head h // (H // Hkv)).
    Under autocast the unit vectors stay float32, hence the projection and the result too: what the record's
    ``F.normalize(v)`` computes under CUDA autocast, which runs ``linalg_vector_norm`` and ``sum`` in float32.
    Without autocast (a bf16 model: the Hessian pass) they take y's dtype, as the record's do there.
    """
    T, H, D = y.shape
    hkv = v.shape[1]
    y_g = y.view(T, hkv, H // hkv, D)  # [T, Hkv, G, D]
    v_hat = F.normalize(v.float(), dim=-1)[:, :, None, :]  # [T, Hkv, 1, D] float32
    if not torch.is_autocast_enabled(y.device.type):
        v_hat = v_hat.to(y.dtype)
    proj = (y_g * v_hat).sum(dim=-1, keepdim=True)  # [T, Hkv, G, 1]
    return (y_g - proj * v_hat).view(T, H, D)


class MLP(nn.Module):
    """``down(act(up(x)))``; ``up``/``down`` are separate modules for hooks.

    ``use_fused_kernels`` (set by GPT) runs the whole MLP as one op (``kernels.mlp``: the activation in the
    up-projection's epilogue, its derivative in the backward matmul's), but only while ``up`` and ``down`` are
    plain hook-free nn.Linear modules: a Hessian hook or a LoRA wrapper on either must see its call, so it
    disables fusion.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = _linear(cfg.model_dim, cfg.mlp_hidden)
        self.down = _linear(cfg.mlp_hidden, cfg.model_dim)
        self.activation = cfg.mlp_activation
        self.slope = cfg.leaky_relu_slope
        self.use_fused_kernels = False

    def _fusable(self) -> bool:
        return self.use_fused_kernels and plain_linear(self.up) and plain_linear(self.down)

    def forward(self, x: Tensor, out_scale: Optional[Tensor] = None) -> Tensor:  # [T, d] -> [T, d]
        """``out_scale`` [d]: the output multiplied by it, folded into ``down``'s weight (the caller checks that
        ``down`` is a :func:`plain_linear`)."""
        if self._fusable():  # relu^2 is the slope-0 case of the fused kernels
            slope = self.slope if self.activation == "leaky_relu_sq" else 0.0
            down = self.down.weight if out_scale is None else row_scaled(self.down.weight, out_scale)
            return kernels.mlp(x, self.up.weight, down, slope)
        hidden = mlp_activation(self.up(x), self.activation, self.slope)  # (up/down may be wrappers: LoRA)
        return self.down(hidden) if out_scale is None else F.linear(hidden, row_scaled(self.down.weight, out_scale))


