"""One optimizer step of the training loop: micro-batch forward/backward, then clip, reduce and update.

The order of clipping and averaging is a named option (``train.clip_scope``), because with several ranks it
changes the update (0.06 relative on a tiny two-rank example):

- ``global`` (pgolf): average every gradient over ranks (fp32), then clip the average by its norm; Muon is built
  with ``average_grads=False``. The update is then independent of the number of ranks.
- ``per_rank`` (PR #1855): clip each rank's own accumulated gradient, then average the clipped gradients: the
  loop averages AdamW's (in their dtype), Muon averages its own at its precision (bf16 under ``record_bf16``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from pgolf.data.shards import BOS_ID
from pgolf.model.attention import build_cu_seqlens, pad_cu_seqlens
from pgolf.train.distributed import DistInfo
from pgolf.train.optim import Muon, allreduce_grads

CU_SEQLENS_PADS = ("pow2", "multiple_of_64")
RECORD_CU_BUCKET = 64  # PR #1855 pads cu_seqlens to a multiple of 64 (one compiled graph per multiple)


def cu_seqlens_bucket(num_entries: int, minimum: int = 16) -> int:
    """Pad cu_seqlens to the next power of two: a compiled step then sees a handful of shapes, not one per batch."""
    return max(minimum, 1 << (num_entries - 1).bit_length())


def cu_seqlens_padded_length(num_entries: int, pad: str) -> int:
    """The padded cu_seqlens length for ``train.cu_seqlens_pad``: ``pow2`` or ``multiple_of_64`` (the record)."""
    if pad == "pow2":
        return cu_seqlens_bucket(num_entries)
    if pad == "multiple_of_64":
        return -(-num_entries // RECORD_CU_BUCKET) * RECORD_CU_BUCKET
    raise ValueError(f"cu_seqlens_pad: expected one of {CU_SEQLENS_PADS}, got {pad!r}")


def micro_batch_segments(inputs: torch.Tensor, seq_len: int, pad: str) -> tuple[torch.Tensor, int]:
    """(padded cu_seqlens int32 [m], max_seqlen) of a packed row [n]: documents from BOS, cut every ``seq_len``.

    The model gets ``max_seqlen = seq_len`` (the bound), as in the record, not the realized longest segment.
    """
    cu_seqlens, max_seqlen = build_cu_seqlens(inputs, bos_id=BOS_ID, max_seqlen=seq_len)
    return pad_cu_seqlens(cu_seqlens, cu_seqlens_padded_length(cu_seqlens.numel(), pad)), max_seqlen


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain float32 on CPU (tests compare processes and need no bf16 rounding)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def forward_backward(
    step_model: torch.nn.Module,
    inputs: torch.Tensor,  # [n] token ids
    targets: torch.Tensor,  # [n] next tokens
    cu_seqlens: torch.Tensor,  # [segments + 1], padded
    max_seqlen: int,
    grad_accum_steps: int,
    device: torch.device,
    compiled: bool,
) -> torch.Tensor:
    """One micro-batch of a step: move it to the device, forward under autocast, backward of loss / accumulation.

    Returns the detached loss. Under compile the cu_seqlens length is marked dynamic: one graph serves every
    segment count (bucketing alone still recompiled ~50 s per new bucket on an H100).
    """
    if device.type == "cuda" and not inputs.is_cuda:  # pinned: the copies below really are asynchronous
        inputs, targets, cu_seqlens = (t if t.is_pinned() else t.pin_memory() for t in (inputs, targets, cu_seqlens))
    inputs = inputs.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    if compiled:
        torch._dynamo.mark_dynamic(cu_seqlens, 0)
    with autocast_for(device):
        loss = step_model(inputs, targets, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    (loss / grad_accum_steps).backward()
    return loss.detach()


class EagerMicroBatches:
    """:func:`forward_backward` behind the CUDA graphs runner's interface (``runner(inputs, targets, cu_seqlens,
    max_seqlen) -> loss`` and ``runner.eager(...)``), for ``train.cuda_graphs`` off or no CUDA: the training loop and
    the bench then call one runner, whichever it is."""

    def __init__(self, step_model, device: torch.device, grad_accum_steps: int, compiled: bool):
        self.step_model, self.device = step_model, device
        self.grad_accum_steps, self.compiled = grad_accum_steps, compiled

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor,
                 max_seqlen: int) -> torch.Tensor:
        return forward_backward(self.step_model, inputs, targets, cu_seqlens, max_seqlen, self.grad_accum_steps,
                                self.device, self.compiled)

    eager = __call__  # without graphs every micro-batch runs eagerly


def _replicated_params(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.nn.Parameter]:
    """Parameters of every optimizer but Muon (AdamW's): their gradients are averaged by the loop."""
    return [p for opt in optimizers if not isinstance(opt, Muon) for g in opt.param_groups for p in g["params"]]


def muon_averages_grads(clip_scope: str) -> bool:
    """Whether Muon must average its own gradients: only when they reach it un-averaged (``per_rank``)."""
    return clip_scope == "per_rank"


def optimizer_step(
    params: list[torch.nn.Parameter],
    optimizers: Sequence[torch.optim.Optimizer],
    grad_clip_norm: float,
    info: DistInfo | None,
    clip_scope: str = "global",
) -> None:
    """After a step's micro-batches: clip and average (in ``clip_scope``'s order), step every optimizer, zero grads.

    ``params``: every trained parameter, in the model's order (the clip norm sums them in this order). Under
    ``per_rank`` Muon must average its own gradients (built with ``average_grads=True``); under ``global`` it
    must not (``average_grads=False``): :func:`muon_averages_grads` says which.
    """
    distributed = info is not None and info.enabled
    if clip_scope == "global":
        if distributed:
            allreduce_grads(params)
        if grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    elif clip_scope == "per_rank":
        if grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
        if distributed:
            allreduce_grads(_replicated_params(optimizers))
    else:
        raise ValueError(f"clip_scope: expected 'global' or 'per_rank', got {clip_scope!r}")
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
