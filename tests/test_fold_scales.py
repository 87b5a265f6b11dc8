"""``GPT.fold_output_scales`` (``train.fold_output_scales``): attn_scale / mlp_scale applied through the o / down
weights computes the same loss and the same gradients as applying them to the sublayer outputs, in float64 where
only rounding could tell them apart; hooked or wrapped projections are used unfolded, so Hessians still see them.
The record-oracle training test (tests/test_record_train_oracle.py) runs the record recipe, whose training
stage switches the fold on, against the record's own script."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pgolf.config import TrainConfig
from pgolf.model.gpt import GPT, plain_linear, row_scaled
from test_model import SEQ_LEN, document, randomized, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one CPU thread (tests/conftest.py)


def _packed(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([document(n, seed=i) for i, n in enumerate(lengths)])
    return ids[:-1], ids[1:]


def _loss_and_grads(model: GPT, fold: bool, ids: torch.Tensor, targets: torch.Tensor):
    model.fold_output_scales = fold
    model.zero_grad(set_to_none=True)
    loss = model(ids, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.parametrize("lanes_from", [2, -1])
def test_fold_computes_the_same_loss_and_gradients(looping, lanes_from):
    """Every scale non-trivial (randomized), several documents per row, both loop states, lanes on and off."""
    model = randomized(tiny(parallel_residual_start=lanes_from), seed=3).double().train()
    model.looping = looping
    ids, targets = _packed([7, 20, 5, 13])
    loss_plain, grads_plain = _loss_and_grads(model, False, ids, targets)
    loss_fold, grads_fold = _loss_and_grads(model, True, ids, targets)
    assert torch.allclose(loss_plain, loss_fold, rtol=1e-13, atol=0)
    assert grads_plain.keys() == grads_fold.keys()
    scales = [n for n in grads_plain if n.endswith(("attn_scale", "mlp_scale"))]
    assert scales and all(grads_plain[n].abs().max() > 0 for n in scales)  # the folded gradients are really tested
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_fold[name], rtol=1e-10, atol=1e-13), name


def test_fold_in_float32_differs_by_rounding_only():
    model = randomized(tiny(), seed=4).train()
    ids, targets = _packed([9, 30])
    loss_plain, grads_plain = _loss_and_grads(model, False, ids, targets)
    loss_fold, grads_fold = _loss_and_grads(model, True, ids, targets)
    assert torch.allclose(loss_plain, loss_fold, rtol=1e-5, atol=0)
    for name in grads_plain:
        scale = grads_plain[name].abs().max().clamp_min(1e-6)
        assert (grads_plain[name] - grads_fold[name]).abs().max() <= 1e-4 * scale, name


def test_fold_reaches_every_block_and_is_not_saved():
    model = GPT(tiny(), train_seq_len=SEQ_LEN)
    assert model.fold_output_scales is False and not any(b.fold_output_scales for b in model.blocks)
    model.fold_output_scales = True
    assert all(b.fold_output_scales for b in model.blocks)
    assert not any("fold" in key for key in model.state_dict())
    assert TrainConfig().fold_output_scales is True  # the training stage switches it on (config.yaml too)


def test_hooked_projections_are_called_unfolded():
    """A Hessian hook on o / down must see every call with the input the record's model gives it."""
    model = randomized(tiny(), seed=5)
    model.fold_output_scales = True
    ids, _ = _packed([11, 6])
    seen: dict[str, int] = {}

    def hook(name):
        return lambda module, args: seen.__setitem__(name, seen.get(name, 0) + 1)

    block = model.blocks[0]
    handles = [block.attn.o.register_forward_pre_hook(hook("o")),
               block.mlp.down.register_forward_pre_hook(hook("down"))]
    assert not plain_linear(block.attn.o) and not plain_linear(block.mlp.down)
    with torch.no_grad():
        hooked = model.forward_logits(ids)
    assert seen == {"o": 1, "down": 1}
    for h in handles:
        h.remove()
    assert plain_linear(block.attn.o)
    with torch.no_grad():
        model.fold_output_scales = False
        plain = model.forward_logits(ids)
    assert torch.allclose(hooked, plain, rtol=1e-5, atol=1e-5)


def test_plain_linear_and_row_scaled():
    assert plain_linear(nn.Linear(4, 3, bias=False))
    assert not plain_linear(nn.Linear(4, 3))  # a bias would not scale with the rows' fold
    wrapped = nn.Sequential(nn.Linear(4, 3, bias=False))
    assert not plain_linear(wrapped)
    w, s, x = (torch.randn(*shape, dtype=torch.float64) for shape in ((3, 4), (3,), (5, 4)))
    assert torch.allclose(nn.functional.linear(x, row_scaled(w, s)), s * nn.functional.linear(x, w))


class _Wrapped(nn.Module):
    """A stand-in for a LoRA wrapper: no ``weight`` of its own, and it adds to the wrapped projection's output."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.extra = nn.Linear(base.in_features, base.out_features, bias=False)
        nn.init.normal_(self.extra.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.extra(x)


def test_wrapped_projections_are_called_unfolded():
    """TTT's LoRA wraps up / down / o: with the fold on, the wrapped modules are called and the output scaled after."""
    model = randomized(tiny(), seed=6)
    ids, _ = _packed([10, 9])
    for block in model.blocks:
        block.mlp.up, block.mlp.down = _Wrapped(block.mlp.up), _Wrapped(block.mlp.down)
        block.attn.o = _Wrapped(block.attn.o)
    with torch.no_grad():
        model.fold_output_scales = True
        folded = model.forward_logits(ids)
        model.fold_output_scales = False
        plain = model.forward_logits(ids)
    assert torch.equal(folded, plain)
