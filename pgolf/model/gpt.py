"""The GPT of the record (PR #1855) with every architectural feature behind a ``ModelConfig`` switch.

Inputs are PACKED rows: one 1-D tensor of T token ids holding many BOS-started documents. Attention is
restricted to segments (documents, cut every ``train_seq_len`` tokens; see ``pgolf.model.attention``) and RoPE
positions restart at each segment, so a document's outputs do not depend on what was packed before it.

Forward, per packed row (shapes: T tokens, d = model_dim), exactly the record's (checked against its script by
tests/test_record_oracle.py):
  x = embed(ids)                                           [T, d]
  x = SmearGate(x)  (x_t += lam * sigmoid(W . x_t[:w]) * x_{t-1} * not_bos_t, on the RAW embedding)
  x = x0 = rmsnorm(x)
  for each block application in the virtual order (depth recurrence repeats loop_start..loop_end):
      encoder half (the first len(order) // 2 applications): x = block(x, x0); skip.push(x)
      decoder half: x = lerp(w_i * skip.pop(), x, sigmoid(g_i)) (U-Net), then x = block(x, x0),
                    or the two-lane form (below) once the physical layer is >= parallel_residual_start
  logits = softcap(head(rmsnorm(x)))                       [T, V]

Design decisions (the parameter count 35,945,671 of the record follows from them):
  * U-Net skips span the VIRTUAL block applications: with looping on the record has 17 applications, the first
    17 // 2 = 8 form the encoder, so there are 8 skip slots (weights [8, d] init 1, gates [8, d] init 0).
    Decoder application i uses slot i. With looping off (11 applications, 5 + 6) slots 0..4 are used and
    5..7 wait (they still receive zero gradients, never None).
  * Two residual lanes ("parallel residual") run in the DECODER applications whose physical layer is
    >= parallel_residual_start (encoder applications are always single-lane). At the first one both lanes start
    as x, then the U-Net skip merges into lane 0 only. Their lambdas are allocated for EVERY physical layer,
    ``lane_post_lambdas [L, 2, 2]`` (init 1) and ``lane_resid_lambdas [L, 2]`` (init 1.1) = 6 x 11 = 66 values in
    the record; rows of layers that never run two-lane stay unused (zero grads). One two-lane block reads both
    lanes as they ENTER it: ``a = Attn(mix(lane0, x0))`` (the residual keeps the unmixed lane 0), ``m =
    MLP(lane1)``, then ``lane_j = resid[j] * lane_j + post[0, j] * a + post[1, j] * m`` (post indexed [sublayer,
    lane], resid by lane). The final hidden state is the mean of the lanes.
  * RoPE turns each (x1, x2) pair by MINUS the angle, with the record's frequencies rounded to bf16 (its models
    are cast to bf16 and its inv_freq buffer is never restored to fp32): ``rope_inv_freq``.
  * Every scalar parameter is cast to the residual stream's dtype where it is used, as the record does, so a bf16
    embedding (``train.param_storage: record``) keeps the whole stream in bf16 under autocast; so do ``rms_norm``
    (torch >= 2.12's autocast would widen it) and the RoPE tables (fp32 buffers looked up per token, cast to q/k).
  * SmearGate masks x_{t-1} only at BOS (the record's fix): a document cut into several attention segments
    keeps smearing across the cut (same document, causal). The row's first token has no predecessor (zero).
  * Single-lane block: ``x_in = resid_mix[0] * x + resid_mix[1] * x0`` REPLACES the residual (as in the record
    scripts), then ``x = x_in + attn_scale * Attn(rmsnorm(x_in) * s)``, ``x = x + mlp_scale * MLP(rmsnorm(x) * s)``
    with s = 1/sqrt(layer + 1).

Runtime state (plain attributes, never tensors, so torch.compile guards on them and they are not saved):
  ``looping`` (depth recurrence on/off; False after construction - training switches it on, Hessians and
  evaluation must set it explicitly), ``train_seq_len`` (cut length used when cu_seqlens is not given),
  ``bos_id``, ``attn_backend`` (None = best for the device; ``set_attention_backend`` sets it from the recipe's
  ``attention_backend`` and keeps the record in ``attention_choice``), ``use_fused_kernels`` (the Triton kernels of
  ``pgolf.model.kernels`` for the MLP up-projection + activation and the loss; default on when CUDA and triton are
  present; they fall back to the PyTorch code for CPU tensors, so the switch changes speed, not results),
  ``fold_output_scales`` (attn_scale / mlp_scale applied through the o / down weights: the same function, float
  rounding aside; off after construction, ``train.fold_output_scales`` switches it on for training).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pgolf.model import kernels
from pgolf.model.attention import build_cu_seqlens, resolve_backend
from pgolf.model.layers import MLP, Attention, _linear, rms_norm
from pgolf.model.layers import exclusive_self_attention, mlp_activation, row_scaled  # noqa: F401 (re-exported)
from pgolf.model.layers import plain_linear
from pgolf.model.walk import walk_blocks
from pgolf.model.rope import ROPE_BUFFERS, apply_partial_rope, rope_buffers, token_rope  # noqa: F401 (re-exported)
from pgolf.model.rope import rope_cache, rope_inv_freq, rope_tables  # noqa: F401 (re-exported)
from pgolf.config import ModelConfig

ROLES = ("attn", "mlp", "embedding", "head", "attn_gate", "gate", "scalar")
# optimizer group of each role: Muon for matrices, AdamW (embedding lr) for embedding/head, AdamW (scalar lr) else
ROLE_TO_GROUP = {
    "attn": "matrix",
    "mlp": "matrix",
    "embedding": "embedding",
    "head": "embedding",
    "attn_gate": "scalar",
    "gate": "scalar",
    "scalar": "scalar",
}
GROUPS = ("matrix", "embedding", "scalar")
LANE_RESID_INIT = 1.1


# --------------------------------------------------------------------------------------------------------------
# Small pure functions of the head and the loss (the sublayers' own are in pgolf.model.layers)
# --------------------------------------------------------------------------------------------------------------


def softcap(logits: Tensor, cap: float) -> Tensor:
    """``cap * tanh(z / cap)``: bounds logits smoothly; cap <= 0 disables."""
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def softcapped_cross_entropy(logits: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Mean cross-entropy in fp32 (fp64 for fp64 logits, as the fused path) over targets != -100. logits [T, V]
    (any float dtype), targets [T]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(softcap(logits, cap), targets, ignore_index=-100, reduction="mean")


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


class TiedHead(nn.Module):
    """LM head that reuses the token embedding matrix, as a module so hooks (Hessians, LoRA) can find it by name.

    The embedding module is stored OUTSIDE ``_modules`` on purpose: the weight then has one name
    (``tok_emb.weight``) in ``named_parameters`` and in ``state_dict``. It is looked up at call time, so
    ``.to()``, ``to_empty`` and ``deepcopy`` (which copies the reference through its memo) stay consistent.
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)

    @property
    def weight(self) -> Tensor:
        return self._embedding.weight  # [V, d]

    def forward(self, h: Tensor) -> Tensor:  # [T, d] -> [T, V]
        weight = self._embedding.weight
        if weight.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
            weight = weight.to(h.dtype)  # a bf16-stored embedding on an fp32 stream (runs without autocast)
        return F.linear(h, weight)


class SmearGate(nn.Module):
    """``x_t += lam * sigmoid(W . x_t[:window]) * x_{t-1} * not_bos_t``: a cheap bigram-like look-back.

    W [1, window] and lam start at zero, so the gate is the identity at init. Without the BOS mask the last
    token of one document leaks into the BOS of the next (the bug fixed in PR #1851).
    """

    def __init__(self, model_dim: int, window: int, bos_mask: bool):
        super().__init__()
        self.window = window
        self.bos_mask = bos_mask
        self.gate = _linear(window, 1)
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, input_ids: Tensor, bos_id: int, reset: Optional[Tensor] = None) -> Tensor:
        """x [T, d], ids [T]; ``reset`` bool [T]: tokens with no predecessor (starts of independent rows packed
        into one stream, e.g. Hessian calibration rows)."""
        prev = F.pad(x[:-1], (0, 0, 1, 0))  # [T, d]; the row's first token has no predecessor
        g = torch.sigmoid(self.gate(x[:, : self.window]))  # [T, 1]
        if self.bos_mask:
            g = g * (input_ids != bos_id).to(g.dtype)[:, None]
        if reset is not None:
            g = g * (~reset).to(g.dtype)[:, None]
        return x + (self.lam.to(x.dtype) * g.to(x.dtype)) * prev


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.model_dim
        self.layer = layer
        self.ln_scale = 1.0 / math.sqrt(layer + 1)
        self.attn = Attention(cfg, use_xsa=layer >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.resid_mix = nn.Parameter(torch.ones(2, d))  # [2, d]: rows weigh x and x0; reset_parameters sets [1, 0]
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        # runtime state (GPT.fold_output_scales): attn_scale / mlp_scale folded into the o / down weights
        self.fold_output_scales = False

    def param_roles(self) -> dict[str, str]:
        roles = {f"attn.{k}": r for k, r in self.attn.param_roles().items()}
        roles.update({"mlp.up.weight": "mlp", "mlp.down.weight": "mlp"})
        roles.update({"resid_mix": "scalar", "attn_scale": "scalar", "mlp_scale": "scalar"})
        return roles

    def _attn(self, x_in: Tensor, ctx: tuple) -> Tensor:
        h = rms_norm(x_in) * self.ln_scale
        if self.fold_output_scales and plain_linear(self.attn.o):
            return self.attn(h, *ctx, out_scale=self.attn_scale)
        out = self.attn(h, *ctx)
        return self.attn_scale.to(out.dtype) * out

    def _mlp(self, x: Tensor) -> Tensor:
        h = rms_norm(x) * self.ln_scale
        if self.fold_output_scales and plain_linear(self.mlp.down):
            return self.mlp(h, out_scale=self.mlp_scale)
        out = self.mlp(h)
        return self.mlp_scale.to(out.dtype) * out

    def _mix(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)  # [2, d]
        return mix[0] * x + mix[1] * x0

    def forward(self, x: Tensor, x0: Tensor, ctx: tuple) -> Tensor:  # [T, d] -> [T, d]
        x_in = self._mix(x, x0)
        x = x_in + self._attn(x_in, ctx)
        return x + self._mlp(x)

    def forward_lanes(
        self, lane0: Tensor, lane1: Tensor, x0: Tensor, ctx: tuple, post: Tensor, resid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Two-lane form; both sublayers read the lanes as they enter. post [2 sublayers, 2 lanes], resid [2 lanes]."""
        attn_out = self._attn(self._mix(lane0, x0), ctx)  # the residual keeps the unmixed lane 0
        mlp_out = self._mlp(lane1)
        post, resid = post.to(lane0.dtype), resid.to(lane0.dtype)
        new0 = resid[0] * lane0 + post[0, 0] * attn_out + post[1, 0] * mlp_out
        new1 = resid[1] * lane1 + post[0, 1] * attn_out + post[1, 1] * mlp_out
        return new0, new1


class GPT(nn.Module):
    """The language model. ``forward`` returns the mean loss, ``forward_logits`` the softcapped fp32 logits."""

    def __init__(self, cfg: ModelConfig, *, train_seq_len: int = 2048, bos_id: int = 1):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"GPT: expected a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d, L = cfg.model_dim, cfg.num_layers
        # runtime state (see module docstring)
        self.looping = False
        self.train_seq_len = train_seq_len
        self.bos_id = bos_id
        self.attn_backend: Optional[str] = None
        self.attention_choice: Optional[dict] = None
        self._use_fused_kernels = False  # set through the property below, once the blocks exist
        self._fold_output_scales = False  # likewise

        # _weight skips nn.Embedding's own N(0, 1) init: reset_parameters() sets the record's, and on the meta
        # device normal_ would import torch._dynamo (seconds) for nothing
        self.tok_emb = nn.Embedding(cfg.vocab_size, d, _weight=torch.empty(cfg.vocab_size, d))
        self.smear = SmearGate(d, cfg.smear_gate_window, cfg.smear_bos_mask) if cfg.smear_gate else None
        self.blocks = nn.ModuleList([Block(cfg, layer) for layer in range(L)])

        self.num_skip_slots = self._num_skips(len(self.virtual_layers(looping=True))) if cfg.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(self.num_skip_slots, d)) if cfg.unet_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skip_slots, d)) if cfg.unet_skips and cfg.skip_gates else None
        # eval-time only (pgolf/evaluate/bigram_hash.py, evaluate.ttt.bigram_hash_buckets): attached by the TTT loop, never saved
        self.bigram_hash: Optional[nn.Module] = None

        lanes = cfg.parallel_residual_start >= 0
        self.lane_post_lambdas = nn.Parameter(torch.ones(L, 2, 2)) if lanes else None
        self.lane_resid_lambdas = nn.Parameter(torch.full((L, 2), LANE_RESID_INIT)) if lanes else None

        self.lm_head: nn.Module = TiedHead(self.tok_emb) if cfg.tie_embeddings else _linear(d, cfg.vocab_size)

        if cfg.rope_dims > 0:  # non-persistent: frequencies, cos/sin [train_seq_len, r/2] fp32 (pgolf.model.rope)
            for name, t in zip(ROPE_BUFFERS, rope_buffers(cfg.rope_dims, cfg.rope_base, max(int(train_seq_len), 1))):
                self.register_buffer(name, t, persistent=False)
        else:
            self.rope_inv_freq = self.rope_cos = self.rope_sin = None
        # the dtype the model was cast to (a buffer follows .to(dtype)); the embedding alone may be stored in bf16
        self.register_buffer("_dtype_probe", torch.zeros(()), persistent=False)
        self.use_fused_kernels = kernels.fused_kernels_default()
        self.reset_parameters()

    @property
    def use_fused_kernels(self) -> bool:
        """Triton MLP and loss kernels on/off (runtime state, like ``looping``); the setter reaches every MLP."""
        return self._use_fused_kernels

    @use_fused_kernels.setter
    def use_fused_kernels(self, value: bool) -> None:
        self._use_fused_kernels = bool(value)
        for block in self.blocks:
            block.mlp.use_fused_kernels = bool(value)

    @property
    def fold_output_scales(self) -> bool:
        """Each block's ``attn_scale`` / ``mlp_scale`` multiplied into the rows of ``attn.o`` / ``mlp.down`` (a
        [d, d_in] product per call) instead of into the [T, d] sublayer outputs (runtime state; the setter reaches
        every block). The same function; why: the scales' gradients then come from the [d, d_in] weight gradients
        instead of per-channel sums over T tokens of gradient x output, and the backward no longer writes the
        scaled output gradient, one [T, d] pass each (``train.fold_output_scales``). A hooked or wrapped o / down
        (Hessians, LoRA) is used unfolded."""
        return self._fold_output_scales

    @fold_output_scales.setter
    def fold_output_scales(self, value: bool) -> None:
        self._fold_output_scales = bool(value)
        for block in self.blocks:
            block.fold_output_scales = bool(value)

    def set_attention_backend(self, device) -> dict:
        """Resolve ``cfg.attention_backend`` on ``device`` (before compiling) and use it; returns the record."""
        choice = resolve_backend(self.cfg.attention_backend, device)
        self.attn_backend, self.attention_choice = choice.resolved, choice.as_record()
        return self.attention_choice

    # ---------------------------------------------------------------------------------------------- structure

    def virtual_layers(self, looping: Optional[bool] = None) -> tuple[int, ...]:
        """Physical layer of each block application, e.g. 0,1,2,3,4,5,3,4,5,3,4,5,6,...,10 for the record."""
        cfg = self.cfg
        if looping is None:
            looping = self.looping
        if not looping or cfg.loop_count <= 1:
            return tuple(range(cfg.num_layers))
        loop = tuple(range(cfg.loop_start, cfg.loop_end + 1))
        return tuple(range(cfg.loop_start)) + loop * cfg.loop_count + tuple(range(cfg.loop_end + 1, cfg.num_layers))

    @staticmethod
    def _num_skips(num_applications: int) -> int:
        encoder = num_applications // 2
        return min(encoder, num_applications - encoder)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent RoPE buffers in place (``to_empty`` leaves them uninitialized)."""
        if self.rope_inv_freq is not None:
            with torch.no_grad():
                values = rope_buffers(self.cfg.rope_dims, self.cfg.rope_base, len(self.rope_cos))
                for name, t in zip(ROPE_BUFFERS, values):
                    getattr(self, name).copy_(t)

    def reset_parameters(self) -> None:
        """Record init: embedding N(0, embed_init_std); q, k, v, up orthogonal; o, down, gates, untied head zero."""
        cfg = self.cfg
        if self.tok_emb.weight.is_meta:
            return  # shapes only, no values to set
        with torch.no_grad():
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.embed_init_std)
            for block in self.blocks:
                for lin in (block.attn.q, block.attn.k, block.attn.v, block.mlp.up):
                    nn.init.orthogonal_(lin.weight)
                for lin in (block.attn.o, block.mlp.down):
                    nn.init.zeros_(lin.weight)
                if block.attn.gate is not None:
                    nn.init.zeros_(block.attn.gate.weight)
                if block.attn.q_gain is not None:
                    block.attn.q_gain.fill_(cfg.q_gain_init)
                block.resid_mix[0].fill_(1.0)
                block.resid_mix[1].zero_()
                block.attn_scale.fill_(1.0)
                block.mlp_scale.fill_(1.0)
            if self.smear is not None:
                nn.init.zeros_(self.smear.gate.weight)
                self.smear.lam.zero_()
            if self.skip_weights is not None:
                self.skip_weights.fill_(1.0)
            if self.skip_gates is not None:
                self.skip_gates.zero_()
            if self.lane_post_lambdas is not None:
                self.lane_post_lambdas.fill_(1.0)
                self.lane_resid_lambdas.fill_(LANE_RESID_INIT)
            if not cfg.tie_embeddings:
                nn.init.zeros_(self.lm_head.weight)

    # ----------------------------------------------------------------------------------------------- roles

    def param_roles(self) -> dict[str, str]:
        """Every parameter name -> its role (one of ROLES). Declared per module; checked to be complete."""
        roles = {"tok_emb.weight": "embedding"}
        for i, block in enumerate(self.blocks):
            roles.update({f"blocks.{i}.{k}": r for k, r in block.param_roles().items()})
        if self.smear is not None:
            roles.update({"smear.gate.weight": "gate", "smear.lam": "gate"})
        if self.skip_weights is not None:
            roles["skip_weights"] = "scalar"
        if self.skip_gates is not None:
            roles["skip_gates"] = "gate"
        if self.lane_post_lambdas is not None:
            roles.update({"lane_post_lambdas": "scalar", "lane_resid_lambdas": "scalar"})
        if not self.cfg.tie_embeddings:
            roles["lm_head.weight"] = "head"
        names = [name for name, _ in self.named_parameters()]
        missing = sorted(set(names) - set(roles))
        stale = sorted(set(roles) - set(names))
        if missing or stale:
            raise RuntimeError(f"GPT.param_roles: parameters without a role {missing}; roles without a parameter {stale}")
        return {name: roles[name] for name in names}

    def hessian_inputs(self) -> dict[str, Optional[str]]:
        """For each GPTQ-quantized matrix (role attn/mlp/embedding/head): the module whose forward INPUT feeds it.

        Register one forward pre-hook per distinct module name and accumulate ``x^T x`` (looped layers fire
        once per application). q, k and v share ``blocks.i.attn.q``'s input (the normalized attention input);
        o is fed by the gated attention output; down by the activation; the tied embedding and an untied head
        by the final-norm output (module ``lm_head``). An untied input embedding has no input activation: None.
        """
        out: dict[str, Optional[str]] = {}
        for i in range(len(self.blocks)):
            p = f"blocks.{i}"
            for name in ("q", "k", "v"):
                out[f"{p}.attn.{name}.weight"] = f"{p}.attn.q"
            out[f"{p}.attn.o.weight"] = f"{p}.attn.o"
            out[f"{p}.mlp.up.weight"] = f"{p}.mlp.up"
            out[f"{p}.mlp.down.weight"] = f"{p}.mlp.down"
        if self.cfg.tie_embeddings:
            out["tok_emb.weight"] = "lm_head"
        else:
            out["lm_head.weight"] = "lm_head"
            out["tok_emb.weight"] = None
        return out

    # --------------------------------------------------------------------------------------------- forward

    def _segments(self, input_ids: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int]) -> tuple[Tensor, int]:
        if input_ids.ndim != 1:
            raise ValueError(f"GPT: input_ids must be a packed 1-D row [T], got shape {tuple(input_ids.shape)}")
        if cu_seqlens is None:
            return build_cu_seqlens(input_ids, self.bos_id, self.train_seq_len if max_seqlen is None else max_seqlen)
        if max_seqlen is None:
            raise ValueError("GPT: max_seqlen is required when cu_seqlens is given")
        return cu_seqlens, max_seqlen

    def _skip(self, x: Tensor, skip: Tensor, slot: int) -> Tensor:
        w = self.skip_weights[slot].to(skip.dtype) * skip
        if self.skip_gates is None:
            return x + w
        return torch.lerp(w, x, torch.sigmoid(self.skip_gates[slot].to(x.dtype)))

    def forward_hidden(
        self, input_ids: Tensor, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
        smear_reset: Optional[Tensor] = None, rope_positions: Optional[str] = None,
    ) -> Tensor:
        """Final-normed hidden states [T, d] (the LM head's input). ``smear_reset`` (bool [T]): see SmearGate.
        ``rope_positions``: ``model.rope_positions`` unless given (a caller whose rows are segments passes
        ``segment``: its positions then restart at every row, as in the record's [rows, length] batches)."""
        cu_seqlens, max_seqlen = self._segments(input_ids, cu_seqlens, max_seqlen)
        T = input_ids.shape[0]
        rope = None if self.rope_inv_freq is None else token_rope(
            rope_positions or self.cfg.rope_positions, cu_seqlens, T, max_seqlen,
            self.rope_inv_freq, self.rope_cos, self.rope_sin)
        ctx = (rope, cu_seqlens, max_seqlen, self.attn_backend)

        x = self.tok_emb(input_ids)  # [T, d]; bf16 under train.param_storage: record
        stream_dtype = self._dtype_probe.dtype  # follows .to(dtype) casts of the whole model, not the embedding's storage
        if x.dtype != stream_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(stream_dtype)  # no autocast (CPU runs): a bf16-stored embedding on fp32 matrices (exact values)
        if self.smear is not None:
            # on the raw embedding, then the norm (the record's order); wrappers (evaluate.lora.SlotSmear) take 3 args
            extra = () if smear_reset is None else (smear_reset,)
            x = self.smear(x, input_ids, self.bos_id, *extra)
        x = rms_norm(x)
        if self.bigram_hash is not None:
            x = x + self.bigram_hash(input_ids).to(x.dtype)  # [T, d]
        return self._blocks(x, x0=x, ctx=ctx)

    def _blocks(self, x: Tensor, x0: Tensor, ctx: tuple) -> Tensor:
        """The block applications (:func:`walk_blocks`); returns the final-normed hidden state [T, d]."""
        x = walk_blocks(
            self, x, self.virtual_layers(),
            lambda block, x, slot: block(x, x0, ctx),
            lambda block, lane0, lane1, slot, layer: block.forward_lanes(
                lane0, lane1, x0, ctx, self.lane_post_lambdas[layer], self.lane_resid_lambdas[layer]),
        )
        return rms_norm(x)

    def forward_logits(self, input_ids: Tensor, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        """Softcapped logits in fp32: [T, V]."""
        h = self.forward_hidden(input_ids, cu_seqlens, max_seqlen)
        return softcap(self.lm_head(h).float(), self.cfg.logit_softcap)

    def forward(
        self,
        input_ids: Tensor,
        target_ids: Tensor,
        cu_seqlens: Optional[Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> Tensor:
        """Mean cross-entropy (nats/token) over targets != -100. input_ids, target_ids [T]."""
        if target_ids.shape != input_ids.shape:
            raise ValueError(f"GPT: target_ids shape {tuple(target_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        h = self.forward_hidden(input_ids, cu_seqlens, max_seqlen)
        if self.use_fused_kernels:  # streams the [T, V] logits once; never materializes fp32 copies
            return kernels.softcapped_cross_entropy(self.lm_head(h), target_ids, self.cfg.logit_softcap)
        return softcapped_cross_entropy(self.lm_head(h), target_ids, self.cfg.logit_softcap)


# --------------------------------------------------------------------------------------------------------------
# Parameter groups and counts
# --------------------------------------------------------------------------------------------------------------


def param_groups(model: GPT) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Optimizer groups by role: "matrix" (Muon), "embedding" (AdamW embed lr), "scalar" (AdamW scalar lr).

    Raises RuntimeError unless every parameter lands in exactly one group.
    """
    roles = model.param_roles()
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():
        role = roles[name]
        if role not in ROLE_TO_GROUP:
            raise RuntimeError(f"param_groups: {name} has unknown role {role!r}")
        groups[ROLE_TO_GROUP[role]].append((name, param))
    seen = [id(p) for group in groups.values() for _, p in group]
    every = [id(p) for p in model.parameters()]
    if len(seen) != len(set(seen)) or set(seen) != set(every):
        raise RuntimeError("param_groups: groups do not cover every parameter exactly once")
    return groups


def build_meta(cfg: ModelConfig) -> GPT:
    """The model on the meta device: shapes only, no memory (for counts and summaries)."""
    with torch.device("meta"):
        return GPT(cfg)


def _group_counts(model: GPT) -> dict[str, int]:
    return {group: sum(p.numel() for _, p in params) for group, params in param_groups(model).items()}


def _role_counts(model: GPT) -> dict[str, int]:
    roles = model.param_roles()
    out: dict[str, int] = {}
    for name, param in model.named_parameters():
        out[roles[name]] = out.get(roles[name], 0) + param.numel()
    return out


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per optimizer group ("matrix", "embedding", "scalar"); the total is their sum."""
    return _group_counts(build_meta(cfg))


def count_parameters_by_role(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per role (only roles that occur)."""
    return _role_counts(build_meta(cfg))


def summary_lines(cfg: ModelConfig) -> list[str]:
    """Human-readable parameter summary; the LAST line is ``total_params: N``."""
    model = build_meta(cfg)
    groups, roles = _group_counts(model), _role_counts(model)
    lines = [
        f"model: {cfg.num_layers} layers x {cfg.model_dim} dim, {cfg.num_heads} heads / {cfg.num_kv_heads} KV, "
        f"MLP {cfg.mlp_hidden}, vocab {cfg.vocab_size}, tied {cfg.tie_embeddings}",
        f"block applications: {len(model.virtual_layers(False))} (looping off), {len(model.virtual_layers(True))} (looping on); "
        f"U-Net skip slots: {model.num_skip_slots}",
    ]
    lines += [f"group {g}: {n}" for g, n in groups.items()]
    lines += [f"role {r}: {roles[r]}" for r in ROLES if r in roles]
    lines.append(f"total_params: {sum(groups.values())}")
    return lines
