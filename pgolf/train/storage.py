"""Parameter storage and the EMA of the weights: what the training stage keeps, updates and saves.

``train.param_storage``:

- ``fp32`` (pgolf): every parameter in float32 from its initial value; the saved EMA is float32.
- ``record`` (PR #1855, ``GPT(h).bfloat16()`` then ``restore_fp32_params``): every INITIAL value rounded to bf16
  (e.g. a lane residual weight of 1.1 starts at 1.1015625), then stored in float32, except the token embedding,
  which stays bf16 with no fp32 master copy, so its gradient, its AdamW moments and its updates are bf16 too.
  The EMA is kept in float32 and, at the end, rounded to each live parameter's dtype (the embedding to bf16), as
  the record does before saving. pgolf saves that rounding in float32 tensors, so every later stage reads one
  dtype (the values are the record's, bit for bit).

What the record's bf16 storage also changes lives in the model and is not done here: with a bf16 embedding the
record's residual stream is bf16 under autocast (it casts its fp32 scalars to the activations' dtype), and its RoPE
frequencies are a bf16-rounded buffer.
"""

from __future__ import annotations

from typing import Iterable

import torch

PARAM_STORAGES = ("fp32", "record")


@torch.no_grad()
def apply_param_storage(model: torch.nn.Module, storage: str, bf16_names: Iterable[str]) -> None:
    """Set the storage of ``model``'s parameters after their initial values are in place (init or a checkpoint).

    ``bf16_names``: the parameters kept in bf16 under ``record`` (the token embedding: the training loop passes
    the "embedding" optimizer group). ``fp32`` leaves the model as it is.
    """
    if storage == "fp32":
        return
    if storage != "record":
        raise ValueError(f"param_storage: expected one of {PARAM_STORAGES}, got {storage!r}")
    keep_bf16 = set(bf16_names)
    named = dict(model.named_parameters())
    unknown = sorted(keep_bf16 - set(named))
    if unknown:
        raise ValueError(f"param_storage 'record': no parameter named {unknown[:3]} to keep in bf16")
    for name, p in named.items():
        rounded = p.data.to(torch.bfloat16)
        p.data = rounded if name in keep_bf16 else rounded.to(torch.float32)


class EMA:
    """Exponential moving average of every state_dict entry in float32; ``decay`` 0 keeps the live weights.

    Update ``shadow = decay * shadow + (1 - decay) * live`` as two in-place operations (the record's rounding;
    ``lerp_`` differs in the last bits). :meth:`final_weights` rounds the shadow to each live tensor's dtype
    and returns float32 tensors (see the module docstring).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.live = model.state_dict(keep_vars=True)
        self.shadow = {name: t.detach().float().clone() for name, t in self.live.items()}

    @torch.no_grad()
    def update(self) -> None:
        """The two in-place operations over every tensor as two foreach calls (a few CUDA launches instead of two
        per parameter; the same operations per element, so the same bits)."""
        shadow = [self.shadow[name] for name in self.live]
        torch._foreach_mul_(shadow, self.decay)
        torch._foreach_add_(shadow, [t.detach() for t in self.live.values()], alpha=1.0 - self.decay)

    def final_weights(self) -> dict[str, torch.Tensor]:
        """{name: float32 tensor}: the EMA rounded to the live dtypes (or the live weights when decay is 0)."""
        if self.decay == 0:
            return {name: t.detach().float().clone() for name, t in self.live.items()}
        return {name: s.to(self.live[name].dtype).float() for name, s in self.shadow.items()}
