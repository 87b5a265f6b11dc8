"""Compile warm-up: real steps whose effect is thrown away, then the restore (``train.warmup_*``).

PR #1855's procedure, which the record recipe reproduces (its record run, started by torchrun):

1. snapshot the weights and every optimizer's state (all still empty);
2. take one micro-batch (stream call 0) and run ``warmup_cu_passes`` forward/backward passes on it per padded
   cu_seqlens length (4 lengths, documents cut every ``train_seq_len``), looping off and then on, without an update
   (they only compile graphs; the gradients are zeroed);
3. ``warmup_steps`` real steps with looping off, then ``warmup_steps`` with looping on, each with step index
   0, 1, ... (the Muon momentum warm-up restarts) and lr multiplier 1, on stream calls 1, 2, ...;
4. restore the weights and the optimizer states, and start the real run at stream call 0 again.

What the record's restore misses: under torchrun its Muon keeps the momentum in sharded buffers outside its
state_dict, so they carry the warm-up's momentum into the first real step (1.1 relative change of that update on a
tiny model). ``warmup_restore: record`` keeps Muon's momentum buffers for that reason; ``full`` (pgolf's default,
and the record started without torchrun) restores everything.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor

from pgolf.train.optim import Muon
from pgolf.train.step import cu_seqlens_padded_length

WARMUP_RESTORES = ("full", "record")
CU_WARMUP_LENGTHS = 4  # the record compiles its first four cu_seqlens lengths (64, 128, 192, 256)


def snapshot(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> tuple[dict, list[dict]]:
    """Copies of the model's state_dict and of every optimizer's state_dict."""
    return copy.deepcopy(model.state_dict()), [copy.deepcopy(opt.state_dict()) for opt in optimizers]


def restore(
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    saved: tuple[dict, list[dict]],
    restore_kind: str,
) -> None:
    """Load ``saved`` back; under ``record`` Muon's momentum buffers keep their current values (and dtype)."""
    if restore_kind not in WARMUP_RESTORES:
        raise ValueError(f"warmup_restore: expected one of {WARMUP_RESTORES}, got {restore_kind!r}")
    model_state, opt_states = saved
    kept: list[dict[Tensor, Tensor]] = []
    for opt in optimizers:
        momentum = {}
        if restore_kind == "record" and isinstance(opt, Muon):
            momentum = {p: s["momentum_buffer"] for p, s in opt.state.items() if "momentum_buffer" in s}
        kept.append(momentum)
    model.load_state_dict(model_state)
    for opt, state, momentum in zip(optimizers, opt_states, kept):
        opt.load_state_dict(state)  # (load_state_dict would cast a saved bf16 buffer to fp32: re-insert instead)
        for p, buf in momentum.items():
            opt.state[p]["momentum_buffer"] = buf
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def cu_warmup_seqlens(num_tokens: int, seq_len: int, pad: str) -> list[Tensor]:
    """The cu_seqlens of the compile passes: boundaries every ``seq_len`` over ``num_tokens``, padded with
    ``num_tokens`` to each of the first four padded lengths that hold them (64, 128, 192, 256 for the record)."""
    bounds = list(range(0, num_tokens, max(seq_len, 1))) + [num_tokens]
    first = cu_seqlens_padded_length(len(bounds), pad)
    lengths = [first]
    while len(lengths) < CU_WARMUP_LENGTHS:
        lengths.append(cu_seqlens_padded_length(lengths[-1] + 1, pad))
    out = []
    for length in lengths:
        cu = torch.full((length,), num_tokens, dtype=torch.int32)  # [length]
        cu[: len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
        out.append(cu)
    return out


def run_warmup(
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    loop_states: Sequence[bool],
    warmup_steps: int,
    calls_per_step: int,
    first_step_call: int,
    run_step: Callable[[int, int], object],
    cu_passes: int = 0,
    cu_seqlens_list: Sequence[Tensor] = (),
    compile_pass: Callable[[Tensor], object] | None = None,
    restore_kind: str = "full",
) -> None:
    """The whole warm-up (module docstring). ``loop_states``: (False,) or (False, True) when the model loops.

    ``run_step(step_index, first_call)``: one real step on this rank's stream calls ``first_call`` ..
    ``first_call + calls_per_step - 1``. ``compile_pass(cu_seqlens)``: one forward/backward of the compile-pass
    micro-batch (stream call 0) with the given cu_seqlens, no update. ``first_step_call``: the stream call of the
    first warm-up step (1 when call 0 feeds the compile passes, as in the record).
    """
    if warmup_steps == 0 and cu_passes == 0:
        return
    saved = snapshot(model, optimizers)
    if cu_passes > 0:
        if compile_pass is None:
            raise ValueError("warmup_cu_passes > 0 needs a compile_pass")
        for looping in loop_states:
            model.looping = looping
            for cu_seqlens in cu_seqlens_list:
                for _ in range(cu_passes):
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    compile_pass(cu_seqlens)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
    call = first_step_call
    for looping in loop_states:
        model.looping = looping
        for index in range(warmup_steps):
            run_step(index, call)
            call += calls_per_step
    model.looping = False
    restore(model, optimizers, saved, restore_kind)
