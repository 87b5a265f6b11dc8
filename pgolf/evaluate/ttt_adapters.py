"""The record's per-document LoRA adapters for test-time training, stacked, and their AdamW.

Placement (PR #1855 ``BatchedTTTLoRA``): one adapter set per block APPLICATION (slot s = position in
``GPT.virtual_layers()``: 17 for the record, so a looped layer gets one set per pass), each adapter
``delta(x) = ((x A^T) B^T) * alpha / rank`` with ``A [docs, rank, in]``, ``B [docs, out, rank]``:

* q, k, v: on the normed attention input n, added to the projections;
* o: ALSO on n (the attention input), added to the attention output (not a wrapper around the o projection);
* mlp: a dim -> dim bypass from the MLP input (normed) to the MLP output;
* head: on the final normed hidden state, added to the logits (before the softcap).

Storage, documents first so that a batch's active documents (a suffix) are one slice:
``A_attn [n, S, T, r, d]`` (T = the attention-input targets in q, k, v, o order), ``A_mlp [n, S, r, d]``,
``A_head [n, r, d]``, and per target ``B_t [n, S, out_t, r]`` (``B_head [n, V, r]``). One matmul serves the four
adapters that read n.

Initial A: ``U(-1/sqrt(d), 1/sqrt(d))`` drawn on the CPU from a ``torch.Generator`` one ``[n, r, d]`` block at a
time in the record's construction order (head, q[0..S-1], v[...], k[...], mlp[...], o[...]), B = 0: with the same
seed, the same numbers as the record's ``torch.manual_seed`` + global draws.

AdamW: the fused kernel (``torch._fused_adamw_``, the record's ``fused=True``) over views of the active documents:
``p *= 1 - lr wd``, ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``p -= lr m_hat / (sqrt(v_hat) + eps)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

ATTN_TARGETS = ("q", "k", "v", "o")  # adapters that read the attention input n (stacked in this order)
DRAW_ORDER = ("head", "q", "v", "k", "mlp", "o")  # the record's construction order of the A draws


class LoraLayout:
    """Names, shapes and order of the stacked adapter tensors of one model and recipe."""

    def __init__(self, model_cfg, targets: Sequence[str], rank: int, alpha: float, slots: int):
        d = model_cfg.model_dim
        self.dim, self.rank, self.slots = d, rank, slots
        self.scale = alpha / rank
        self.targets = tuple(targets)
        self.attn_targets = tuple(t for t in ATTN_TARGETS if t in self.targets)
        kv = model_cfg.num_kv_heads * model_cfg.head_dim
        self.out = {"q": model_cfg.num_heads * model_cfg.head_dim, "k": kv, "v": kv, "o": d, "mlp": d,
                    "head": model_cfg.vocab_size}
        self.a_names = (["A_attn"] if self.attn_targets else []) + (["A_mlp"] if "mlp" in self.targets else []) + (
            ["A_head"] if "head" in self.targets else [])
        self.b_names = [f"B_{t}" for t in self.attn_targets] + (["B_mlp"] if "mlp" in self.targets else []) + (
            ["B_head"] if "head" in self.targets else [])
        self.names = self.a_names + self.b_names
        self.index = {name: i for i, name in enumerate(self.names)}

    def shape(self, name: str, n: int) -> tuple[int, ...]:
        S, r, d = self.slots, self.rank, self.dim
        if name == "A_attn":
            return (n, S, len(self.attn_targets), r, d)
        if name == "A_mlp":
            return (n, S, r, d)
        if name == "A_head":
            return (n, r, d)
        target = name[2:]
        return (n, self.out[target], r) if target == "head" else (n, S, self.out[target], r)

    def parameters_per_doc(self) -> int:
        return sum(math.prod(self.shape(name, 1)) for name in self.names)

    def zeros(self, names: Sequence[str], n: int, device, dtype) -> list[Tensor]:
        return [torch.zeros(self.shape(name, n), device=device, dtype=dtype) for name in names]

    @torch.no_grad()
    def draw_a_(self, a_tensors: Sequence[Tensor], generator: torch.Generator) -> None:
        """Fill the A tensors (``a_names`` order, any device) with the record's initial draws, in its order."""
        n = a_tensors[0].shape[0]
        bound = 1.0 / math.sqrt(self.dim)
        by_name = dict(zip(self.a_names, a_tensors))
        for target in DRAW_ORDER:
            if target not in self.targets:
                continue
            if target == "head":
                blocks = [by_name["A_head"]]
            elif target == "mlp":
                blocks = [by_name["A_mlp"][:, s] for s in range(self.slots)]
            else:
                j = self.attn_targets.index(target)
                blocks = [by_name["A_attn"][:, s, j] for s in range(self.slots)]
            for block in blocks:
                draw = torch.empty((n, self.rank, self.dim), dtype=block.dtype).uniform_(-bound, bound, generator=generator)
                block.copy_(draw)


# --------------------------------------------------------------------------------------------------------------
# the deltas (used inside the TTT forward; ``views`` holds the tensors in ``layout.names`` order)
# --------------------------------------------------------------------------------------------------------------


def _bmm_t(x: Tensor, w: Tensor) -> Tensor:
    """x [n, T, a] @ w[n, b, a]^T -> [n, T, b]."""
    return torch.matmul(x, w.transpose(-1, -2).to(x.dtype))


def attn_deltas(layout: LoraLayout, views: Sequence[Tensor], n_in: Tensor, slot: int) -> dict[str, Tensor]:
    """q, k, v, o deltas of application ``slot`` from the normed attention input ``n_in`` [n, w, d]."""
    if not layout.attn_targets:
        return {}
    A = views[layout.index["A_attn"]][:, slot]  # [n, T, r, d]
    n, T, r, d = A.shape
    u = _bmm_t(n_in, A.reshape(n, T * r, d))  # [n, w, T r]
    out = {}
    for j, target in enumerate(layout.attn_targets):
        B = views[layout.index[f"B_{target}"]][:, slot]  # [n, out, r]
        out[target] = _bmm_t(u[..., j * r : (j + 1) * r], B) * layout.scale
    return out


def mlp_delta(layout: LoraLayout, views: Sequence[Tensor], m_in: Tensor, slot: int) -> Optional[Tensor]:
    if "mlp" not in layout.targets:
        return None
    A = views[layout.index["A_mlp"]][:, slot]
    B = views[layout.index["B_mlp"]][:, slot]
    return _bmm_t(_bmm_t(m_in, A), B) * layout.scale


def head_delta(layout: LoraLayout, views: Sequence[Tensor], h: Tensor) -> Optional[Tensor]:
    if "head" not in layout.targets:
        return None
    return _bmm_t(_bmm_t(h, views[layout.index["A_head"]]), views[layout.index["B_head"]]) * layout.scale


# --------------------------------------------------------------------------------------------------------------
# AdamW over the active documents
# --------------------------------------------------------------------------------------------------------------


def adamw_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                exp_avg_sqs: Sequence[Tensor], step: Tensor, *, lr: float, betas: tuple[float, float],
                weight_decay: float, eps: float) -> None:
    """One AdamW step in place (``step`` is a float32 device scalar, incremented here): the fused kernel when the
    device has one, otherwise the same update written out."""
    step.add_(1.0)
    beta1, beta2 = betas
    fused = getattr(torch, "_fused_adamw_", None)
    if fused is not None and params[0].device.type in ("cuda", "cpu"):
        fused(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [], [step] * len(params), amsgrad=False,
              lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None,
              found_inf=None)
        return
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v / bias2).sqrt_().add_(eps)
        p.sub_(lr * (m / bias1) / denom)


class AdapterWorkspace:
    """The tensors of the batch being scored on this process: A, B, gradients' optimizer state and the step.

    ``capacity`` documents (the batch size); a batch of n documents uses the first n. Lanes keep their A between
    batches (:class:`LaneAdapters`); the workspace's addresses never change, so captured CUDA graphs stay valid.
    """

    def __init__(self, layout: LoraLayout, capacity: int, device, dtype):
        self.layout = layout
        self.capacity = capacity
        self.A = layout.zeros(layout.a_names, capacity, device, dtype)
        self.B = layout.zeros(layout.b_names, capacity, device, dtype)
        self.exp_avg = [torch.zeros_like(t) for t in self.A + self.B]
        self.exp_avg_sq = [torch.zeros_like(t) for t in self.A + self.B]
        self.step = torch.zeros((), device=device, dtype=torch.float32)

    @property
    def tensors(self) -> list[Tensor]:
        return self.A + self.B

    @torch.no_grad()
    def begin_batch(self, n: int) -> None:
        """B = 0 and a fresh optimizer state for the first n documents (A is set by the caller)."""
        for t in self.B:
            t[:n].zero_()
        for t in self.exp_avg + self.exp_avg_sq:
            t[:n].zero_()
        self.step.zero_()

    def views(self, a: int, n: int, A: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
        """Leaf views of documents [a, n) that collect gradients (``A``: other A tensors, e.g. a fresh batch's)."""
        a_src = self.A if A is None else A
        return [t[a:n].detach().requires_grad_(True) for t in list(a_src) + self.B]

    @torch.no_grad()
    def step_(self, views: Sequence[Tensor], a: int, n: int, *, lr: float, betas, weight_decay: float,
              eps: float) -> None:
        grads = [v.grad if v.grad is not None else torch.zeros_like(v) for v in views]
        adamw_step_(views, grads, [t[a:n] for t in self.exp_avg], [t[a:n] for t in self.exp_avg_sq], self.step,
                    lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
        for v in views:
            v.grad = None


class LaneAdapters:
    """A lane's adapter A between batches (the record's ``reusable_lora`` of one rank): drawn from the lane's
    generator at the start of every segment, warm-started from batch to batch."""

    def __init__(self, layout: LoraLayout, workspace: AdapterWorkspace, generator: torch.Generator, shared: bool):
        self.layout = layout
        self.workspace = workspace
        self.generator = generator
        self.shared = shared  # the lane's A IS the workspace's (one lane on this process): no copies
        self.A = workspace.A if shared else layout.zeros(layout.a_names, workspace.capacity, workspace.A[0].device,
                                                          workspace.A[0].dtype)

    def draw_(self) -> None:
        self.layout.draw_a_(self.A, self.generator)

    @torch.no_grad()
    def load(self) -> None:
        if not self.shared:
            for dst, src in zip(self.workspace.A, self.A):
                dst.copy_(src)

    @torch.no_grad()
    def store(self, decay: Optional[Tensor] = None) -> None:
        """Keep the workspace's A for the lane's next batch; ``decay`` [n] multiplies each document's A (the
        weight decay of the optimizer steps a finished document sat out)."""
        if decay is not None:
            for t in self.workspace.A:
                t.mul_(decay.to(t.dtype).view(-1, *([1] * (t.ndim - 1))))
        if not self.shared:
            for dst, src in zip(self.A, self.workspace.A):
                dst.copy_(src)
