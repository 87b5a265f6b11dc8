"""Fused gradient accumulation (``train.fused_grad_accumulation``): each micro-batch's parameter gradients are added
into the persistent ``.grad`` buffers inside the compiled backward, instead of by autograd's AccumulateGrad after it.

Why: with accumulation over 8 micro-batches every parameter's gradient is written by the compiled backward (the
bf16 -> fp32 cast of a weight's gradient, the slice of a concatenated q, k, v weight), read back and added into
``.grad`` by a separate ``CUDAFunctor_add`` kernel per parameter: 2.6 ms a step on one H100 (record recipe, looping
off; docs/benchmarks.md). Traced into the backward, the add fuses with the kernel that produces the gradient.

How: the compiled step model calls the model with every trained parameter replaced (``torch.func.functional_call``)
by ``_AddIntoBuffer.apply(param, buffer)``: an alias of the parameter in the forward, whose backward adds the
incoming gradient (autograd has already summed it over every use: tied and looped weights) into ``buffer`` and
gives the parameter no gradient, so AccumulateGrad never runs.

What it computes: ``buffer + g`` with the same ``g`` in the same dtype as AccumulateGrad's ``p.grad += g``; the first
micro-batch of a step adds into a zeroed buffer (``0 + g == g``; only the sign of a zero can differ), as the CUDA
graphs runner already does. Eagerly that is AccumulateGrad's result to the bit. Compiled, inductor may fuse the add
with the reduction that produces ``g`` (a gate or skip weight's gradient, a sum over the tokens) and order that sum
differently: the same sum, rounded differently in the last bits (tests/test_grad_fusion.py).

Which parameters get a gradient: AccumulateGrad leaves ``.grad`` None for a parameter the forward never uses, and the
optimizers then skip it (no weight decay, no momentum step). No autograd event says so here, so the first micro-batch
of each model state (``looping``, ``training``) runs an eager, uncompiled probe of the model on its first
``PROBE_TOKENS`` tokens and asks autograd which parameters have a gradient (which parameters a forward uses does not
depend on the batch); only those are bound to their buffers.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from pgolf.data.shards import BOS_ID
from pgolf.model.attention import build_cu_seqlens
from pgolf.train.step import autocast_for

PROBE_TOKENS = 256  # the probe's row: enough for a few segments, cheap in eager mode


def bind_grad_buffers(params: Sequence[nn.Parameter], buffers: dict[int, Tensor], touched: Sequence[int]) -> None:
    """Make each touched parameter's ``.grad`` its persistent buffer, holding the gradient accumulated so far.

    ``buffers``: parameter index -> buffer (allocated here when missing). A parameter whose ``.grad`` is None
    (``zero_grad(set_to_none=True)`` after a step) gets its buffer zeroed; one holding another tensor gets it copied.
    Untouched parameters keep their ``.grad`` (None after a step), so optimizers skip them.
    """
    to_zero = []
    for i in touched:
        p = params[i]
        buffer = buffers.get(i)
        if buffer is None:
            buffer = buffers[i] = torch.empty_like(p, memory_format=torch.contiguous_format)
        if p.grad is buffer:
            continue
        if p.grad is None:
            to_zero.append(buffer)
        else:
            buffer.copy_(p.grad)
        p.grad = buffer
    if to_zero:
        torch._foreach_zero_(to_zero)


class _AddIntoBuffer(torch.autograd.Function):
    """forward: the parameter itself (an alias, no copy); backward: ``buffer += grad``, no gradient for the parameter."""

    @staticmethod
    def forward(ctx, param: Tensor, buffer: Tensor) -> Tensor:
        ctx.buffer = buffer
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.buffer.add_(grad)
        return None, None


class _Reparametrized(nn.Module):
    """The module the step compiles: the model called with its trained parameters replaced by buffer-adding aliases."""

    def __init__(self, model: nn.Module, names: list[str], params: list[nn.Parameter], buffers: list[Tensor]):
        super().__init__()
        self.model = model
        self.names, self.params, self.grad_buffers = names, params, buffers  # plain lists: not state, not moved

    def forward(self, *args, **kwargs) -> Tensor:
        aliases = {name: _AddIntoBuffer.apply(p, buf) for name, p, buf in zip(self.names, self.params, self.grad_buffers)}
        return torch.func.functional_call(self.model, aliases, args, kwargs)


class FusedGradAccumulation:
    """The step model under ``train.fused_grad_accumulation``: a call ``(inputs, targets, cu_seqlens=, max_seqlen=)``
    binds the gradient buffers of the parameters this model state uses, then runs the (compiled) reparametrized model.

    ``compile_fn``: how the step compiles a module (``pgolf.model.device.compile_model`` with the recipe's options; the
    identity to run eagerly). Build it after the parameters' storage is final (``apply_param_storage``): each buffer
    takes its parameter's dtype, and the compiled graph holds these very buffers.
    """

    def __init__(self, model: nn.Module, compile_fn: Callable[[nn.Module], Callable]):
        self.model = model
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]  # the graphs runner's order: model.parameters() that require grad
        self.buffers = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]
        self.buffer_by_index = dict(enumerate(self.buffers))  # what bind_grad_buffers (and the graphs runner) take
        self.compiled = compile_fn(_Reparametrized(model, [name for name, _ in named], self.params, self.buffers))
        self.touched: dict[tuple[bool, bool], tuple[int, ...]] = {}  # (looping, training) -> parameter indices

    def state(self) -> tuple[bool, bool]:
        return bool(getattr(self.model, "looping", False)), bool(self.model.training)

    def __call__(self, inputs: Tensor, targets: Tensor, cu_seqlens: Optional[Tensor] = None,
                 max_seqlen: Optional[int] = None) -> Tensor:
        touched = self.touched_for(inputs, max_seqlen)
        bind_grad_buffers(self.params, self.buffer_by_index, touched)
        return self.compiled(inputs, targets, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def touched_for(self, inputs: Tensor, max_seqlen: Optional[int]) -> tuple[int, ...]:
        """Indices of the parameters the current model state's forward uses (probed once per state)."""
        state = self.state()
        if state not in self.touched:
            self.touched[state] = self._probe(inputs, max_seqlen)
        return self.touched[state]

    def _probe(self, inputs: Tensor, max_seqlen: Optional[int]) -> tuple[int, ...]:
        """An eager forward of the model itself on the row's first tokens, and which parameters autograd reaches."""
        device = self.params[0].device
        ids = inputs[:PROBE_TOKENS].to(device)  # [n]
        bound = max_seqlen if max_seqlen is not None else ids.numel()
        cu_seqlens, bound = build_cu_seqlens(ids, bos_id=BOS_ID, max_seqlen=bound)
        with autocast_for(device):
            loss = self.model(ids, ids, cu_seqlens=cu_seqlens, max_seqlen=bound)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return tuple(i for i, g in enumerate(grads) if g is not None)
