"""Per-document batched LoRA adapters for test-time training: each document of a batch owns a slot of the packed
row and its own rank-r adapters (``A [slots, in, r]``, ``B [slots, r, out]``, output ``x A B * alpha / r``)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

from pgolf.config import TTTConfig



# --------------------------------------------------------------------------------------------------------------
# Batched per-document LoRA
# --------------------------------------------------------------------------------------------------------------

# target name -> module paths inside each block
BLOCK_TARGETS = {"q": ("attn.q",), "k": ("attn.k",), "v": ("attn.v",), "o": ("attn.o",), "mlp": ("mlp.up", "mlp.down")}


class BatchedLoRA(nn.Module):
    """``base(x) + alpha / r * (x A) B`` with one (A, B) per slot.

    x [T, in] with T = slots * L is viewed as [slots, L, in]; A [slots, in, r], B [slots, r, out]. A starts small
    and random (seeded), B at zero, so a fresh adapter leaves the model unchanged. ``active`` False bypasses it.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, slots: int, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.slots, self.rank = in_features, out_features, slots, rank
        self.scale = alpha / rank
        device = base.weight.device
        self.A = nn.Parameter(torch.zeros(slots, in_features, rank, device=device))
        self.B = nn.Parameter(torch.zeros(slots, rank, out_features, device=device))
        self.active = True

    @torch.no_grad()
    def reset(self, generator: torch.Generator, keep_a: bool) -> None:
        """Fresh adapters: B = 0; A ~ U(-1/sqrt(in), 1/sqrt(in)) drawn on the CPU (same values on any device)."""
        self.B.zero_()
        if not keep_a:
            bound = 1.0 / math.sqrt(self.in_features)
            a = torch.rand(self.A.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
            self.A.copy_(a)

    def forward(self, x: Tensor) -> Tensor:  # [T, in] -> [T, out]
        y = self.base(x)
        if not self.active:
            return y
        xs = x.reshape(self.slots, -1, self.in_features)  # [S, L, in]
        delta = torch.bmm(torch.bmm(xs, self.A.to(xs.dtype)), self.B.to(xs.dtype))  # [S, L, out]
        return y + (self.scale * delta).reshape(x.shape[0], self.out_features).to(y.dtype)


class SlotSmear(nn.Module):
    """SmearGate that treats every slot start as a row start (no predecessor), so no slot sees its neighbour.

    The model's gate masks only at BOS; a slot holding a window that starts mid-document would otherwise mix in
    the last token of the previous slot (another document or padding).
    """

    def __init__(self, inner: nn.Module, slots: int):
        super().__init__()
        self.inner = inner
        self.slots = slots
        self.active = True

    def forward(self, x: Tensor, input_ids: Tensor, bos_id: int) -> Tensor:  # x [T, d]
        out = self.inner(x, input_ids, bos_id)
        if not self.active:
            return out
        T = x.shape[0]
        first = torch.arange(T, device=x.device) % (T // self.slots) == 0  # [T]
        return torch.where(first[:, None], x, out)


class CheckpointedBlock(nn.Module):
    """Recompute a block's activations in backward instead of storing them (``torch.utils.checkpoint``).

    A LoRA step backpropagates through every block application for slots x context tokens (64 x 2048 in the
    record): stored activations alone would pass 70 GB. Checkpointing keeps only each application's inputs and
    costs one extra forward per block in backward. Without grad it is a plain call.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, x0: Tensor, ctx: tuple) -> Tensor:
        if not torch.is_grad_enabled():
            return self.block(x, x0, ctx)
        return torch.utils.checkpoint.checkpoint(self.block, x, x0, ctx, use_reentrant=False)

    def forward_lanes(self, *args):
        if not torch.is_grad_enabled():
            return self.block.forward_lanes(*args)
        return torch.utils.checkpoint.checkpoint(self.block.forward_lanes, *args, use_reentrant=False)


class LoraAdapters:
    """The adapters attached to a model (see :func:`attach_lora`)."""

    def __init__(self, wrappers: dict[str, BatchedLoRA], smear: Optional[SlotSmear]):
        self.wrappers = wrappers
        self.smear = smear

    def parameters(self) -> list[nn.Parameter]:
        return [p for w in self.wrappers.values() for p in (w.A, w.B)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def reset(self, generator: torch.Generator, keep_a: bool) -> None:
        for name in sorted(self.wrappers):
            self.wrappers[name].reset(generator, keep_a)

    def set_active(self, active: bool) -> None:
        for w in self.wrappers.values():
            w.active = active
        if self.smear is not None:
            self.smear.active = active


@contextlib.contextmanager
def attach_lora(model: nn.Module, cfg: TTTConfig, slots: int) -> Iterator[LoraAdapters]:
    """Wrap the target modules of ``model`` with :class:`BatchedLoRA` (its smear with :class:`SlotSmear`, and its
    blocks with :class:`CheckpointedBlock` when ``cfg.checkpoint_activations``), freeze the base weights; on exit put
    the original modules and ``requires_grad`` flags back."""
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    wrappers: dict[str, BatchedLoRA] = {}
    smear = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for i, block in enumerate(model.blocks):
            for target in cfg.lora_targets:
                for path in BLOCK_TARGETS.get(target, ()):
                    parent_path, attr = path.rsplit(".", 1)
                    parent = block.get_submodule(parent_path)
                    base = getattr(parent, attr)
                    out_features, in_features = base.weight.shape
                    wrapper = BatchedLoRA(base, in_features, out_features, slots, cfg.lora_rank, cfg.lora_alpha)
                    setattr(parent, attr, wrapper)
                    replaced.append((parent, attr, base))
                    wrappers[f"blocks.{i}.{path}"] = wrapper
        if "head" in cfg.lora_targets:
            base = model.lm_head
            out_features, in_features = base.weight.shape
            wrapper = BatchedLoRA(base, in_features, out_features, slots, cfg.lora_rank, cfg.lora_alpha)
            model.lm_head = wrapper
            replaced.append((model, "lm_head", base))
            wrappers["lm_head"] = wrapper
        if getattr(model, "smear", None) is not None:
            original = model.smear
            smear = SlotSmear(original, slots)
            model.smear = smear
            replaced.append((model, "smear", original))
        if cfg.checkpoint_activations:
            for i, block in enumerate(model.blocks):
                model.blocks[i] = CheckpointedBlock(block)
                replaced.append((model.blocks, str(i), block))
        yield LoraAdapters(wrappers, smear)
    finally:
        for parent, attr, original in reversed(replaced):
            setattr(parent, attr, original)
        for name, p in model.named_parameters():
            p.requires_grad_(requires.get(name, p.requires_grad))
