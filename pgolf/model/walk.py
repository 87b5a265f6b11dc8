"""The walk over a model's block applications, shared by the model's forward and the TTT forward."""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor


def walk_blocks(model, x: Tensor, order: tuple[int, ...], single: Callable, lanes: Callable) -> Tensor:
    """The block applications in ``order`` (physical layer per application): the single-lane encoder half, then
    the decoder, U-Net skips popped in reverse, two lanes from ``parallel_residual_start`` (split before the skip,
    which goes to lane 0); returns the residual stream before the final norm (the lanes' mean once they split).

    ``single(block, x, slot) -> x`` and ``lanes(block, lane0, lane1, slot, layer) -> (lane0, lane1)`` apply one
    block (slot: the application's index in ``order``); the model's forward and the TTT forward
    (``pgolf.evaluate.ttt_forward``, adapters per application) share this walk."""
    use_skips = model.skip_weights is not None
    num_encoder = len(order) // 2  # U-Net halves over the block APPLICATIONS
    split_at = model.cfg.parallel_residual_start
    skips: list[Tensor] = []
    lane0: Optional[Tensor] = None  # None until the lanes start
    lane1: Optional[Tensor] = None
    for slot, layer in enumerate(order):
        block = model.blocks[layer]
        if slot < num_encoder:
            x = single(block, x, slot)
            if use_skips:
                skips.append(x)
            continue
        skip_slot = slot - num_encoder
        if 0 <= split_at <= layer:
            if lane0 is None:
                lane0 = lane1 = x
            if use_skips and skips:
                lane0 = model._skip(lane0, skips.pop(), skip_slot)
            lane0, lane1 = lanes(block, lane0, lane1, slot, layer)
        else:
            if use_skips and skips:
                x = model._skip(x, skips.pop(), skip_slot)
            x = single(block, x, slot)
    return x if lane0 is None else 0.5 * (lane0 + lane1)
