"""Speed changes that must not change what the model computes (issue 16).

* RoPE tables as buffers: looked up by position in segment, bit-identical to computing them in the forward.
* The residual stream keeps the stream's dtype: with a bf16 embedding under bf16 autocast every block output and
  every saved stream-sized tensor stays bf16 (also when ``F.rms_norm`` follows torch >= 2.12's CUDA policy of
  returning fp32), while the fp32 path is unchanged.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import ModelConfig
from pgolf.model.attention import build_cu_seqlens
from pgolf.model.gpt import GPT, apply_partial_rope, build_meta, rms_norm, rope_cache, rope_inv_freq, rope_tables


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one CPU thread (tests/conftest.py)


# every record feature on: 4 layers (1-2 looped twice -> 6 applications), two lanes from layer 2, XSA everywhere
TINY = ModelConfig(
    vocab_size=300, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, xsa_last_n=4,
    loop_start=1, loop_end=2, loop_count=2, parallel_residual_start=2,
)
SEQ_LEN = 16


def randomized(cfg: ModelConfig = TINY, seed: int = 0) -> GPT:
    """Every zero-initialized path (o, down, gates, smear lambda) active."""
    torch.manual_seed(seed)
    model = GPT(cfg, train_seq_len=SEQ_LEN)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 0.2))
        model.smear.lam.fill_(1.0)
    return model


def packed_row(seed: int = 1) -> torch.Tensor:
    """Three documents, the last longer than SEQ_LEN (cut into two segments)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 300, (50,), generator=g)
    ids[0] = ids[9] = ids[22] = 1
    return ids


def loss_and_grads(model: GPT, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(ids, torch.roll(ids, -1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------- RoPE


def test_rope_cache_equals_the_tables_computed_per_token():
    inv = rope_inv_freq(16, 10000.0)
    cos, sin = rope_cache(2048, inv)
    assert cos.shape == sin.shape == (2048, 8) and cos.dtype == torch.float32
    positions = torch.tensor([0, 1, 2, 7, 1000, 2047, 5, 0])
    c, s = rope_tables(positions, inv)
    assert torch.equal(cos[positions][:, None, :], c) and torch.equal(sin[positions][:, None, :], s)


def test_rope_tables_are_non_persistent_buffers_of_train_seq_len_rows():
    model = GPT(TINY, train_seq_len=SEQ_LEN)
    assert model.rope_cos.shape == (SEQ_LEN, TINY.rope_dims // 2)
    names = {n for n, _ in model.named_buffers()}
    assert {"rope_cos", "rope_sin", "rope_inv_freq"} <= names
    assert not any(k.startswith("rope") for k in model.state_dict())
    assert GPT(dataclasses.replace(TINY, rope_dims=0)).rope_cos is None


@pytest.mark.parametrize("looping", [False, True])
def test_cached_rope_gives_bit_identical_loss_and_grads(looping):
    """The table lookup against the per-token computation (the fallback for segments longer than the cache)."""
    model = randomized()
    model.looping = looping
    ids = packed_row()
    cached = loss_and_grads(model, ids)
    computed_model = copy.deepcopy(model)
    computed_model.rope_cos = computed_model.rope_cos[:1]  # shorter than max_seqlen: the forward computes them
    computed_model.rope_sin = computed_model.rope_sin[:1]
    computed = loss_and_grads(computed_model, ids)
    assert torch.equal(cached[0], computed[0])
    assert cached[1].keys() == computed[1].keys()
    for name, g in cached[1].items():
        assert torch.equal(g, computed[1][name]), name


def test_segments_longer_than_the_cache_still_work():
    model = randomized()
    ids = packed_row()
    cu, _ = build_cu_seqlens(ids, max_seqlen=2 * SEQ_LEN)  # segments up to 32 tokens, cache of 16 rows
    logits = model.forward_logits(ids, cu, 2 * SEQ_LEN)
    assert torch.isfinite(logits).all()
    bigger = GPT(TINY, train_seq_len=2 * SEQ_LEN)
    bigger.load_state_dict(model.state_dict())
    assert torch.equal(bigger.forward_logits(ids, cu, 2 * SEQ_LEN), logits)  # cache lookup == computed


def test_meta_build_then_reset_buffers_restores_the_tables():
    model = build_meta(TINY).to_empty(device="cpu")
    model.reset_buffers()
    fresh = GPT(TINY)
    for name in ("rope_inv_freq", "rope_cos", "rope_sin"):
        assert torch.equal(getattr(model, name), getattr(fresh, name)), name


def test_rope_keeps_the_input_dtype():
    cos, sin = rope_tables(torch.arange(5), rope_inv_freq(8, 10000.0))
    x = torch.randn(5, 2, 16)
    wide = apply_partial_rope(x.double(), cos.double(), sin.double())
    assert torch.equal(apply_partial_rope(x.double(), cos, sin), wide)
    assert apply_partial_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16
    assert torch.equal(apply_partial_rope(x, cos, sin)[..., 8:], x[..., 8:])


# ----------------------------------------------------------------------------------- bf16 residual stream


class _FusedLikeRmsNorm(torch.autograd.Function):
    """RMSNorm as ONE autograd node, like CUDA's fused kernel (saves x in its own dtype and the fp32 rstd), so
    that the census below sees what the model saves and not the pieces of CPU's composite rms_norm (which
    upcasts internally). ``widen`` mimics torch >= 2.12's CUDA autocast policy (fp32 output)."""

    @staticmethod
    def forward(ctx, x, widen):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
        ctx.save_for_backward(x, rstd)
        y = xf * rstd
        return y if widen else y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd = ctx.saved_tensors
        n, g = x.float() * rstd, grad.float()
        return (rstd * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype), None


def _saved_fp32_shapes(loss: torch.Tensor, num_tokens: int) -> dict:
    """{shape: count} of the fp32 tensors with a leading token axis that autograd saved for backward."""
    found: dict = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(node, attr)
                except Exception:  # some saved slots raise once released
                    continue
                tensors += list(value) if isinstance(value, (tuple, list)) else [value]
        if hasattr(node, "saved_tensors"):  # custom autograd.Function nodes
            tensors += list(node.saved_tensors)
        for t in tensors:
            if torch.is_tensor(t) and t.dtype == torch.float32 and t.dim() >= 2 and t.shape[0] == num_tokens:
                found[tuple(t.shape)] = found.get(tuple(t.shape), 0) + 1
        stack.extend(fn for fn, _ in node.next_functions)
    return found


@pytest.mark.parametrize("widening_norm", [False, True], ids=["torch-2.11-norm", "torch-2.12-norm-policy"])
@pytest.mark.parametrize("looping", [False, True])
def test_bf16_embedding_keeps_the_stream_bf16_under_autocast(monkeypatch, widening_norm, looping):
    model = randomized()
    model.looping = looping
    with torch.no_grad():
        model.tok_emb.weight.data = model.tok_emb.weight.data.bfloat16()  # train.param_storage: record
    real_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda x, shape, *a, **k: _FusedLikeRmsNorm.apply(x, widening_norm))
    dtypes = []

    def record(module, inputs, output):
        dtypes.extend(o.dtype for o in (output if isinstance(output, tuple) else (output,)))

    hooks = [m.register_forward_hook(record) for b in model.blocks for m in (b, b.attn, b.mlp)]
    ids = packed_row()
    T = ids.numel()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.forward_hidden(ids)
        loss = model(ids, torch.roll(ids, -1))
    for h in hooks:
        h.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert hidden.dtype == torch.bfloat16
    # (two-lane applications call block.forward_lanes, not the block: their attn and mlp hooks still fire)
    saved = _saved_fp32_shapes(loss, T)
    cfg = model.cfg
    forbidden = {(T, cfg.model_dim), (T, 1, cfg.rope_dims // 2)}
    assert not forbidden & set(saved), f"fp32 stream / rope tensors saved for backward: {saved}"
    # one float32 [T, H, D] per attention application: XSA's result (float32 as the record's under CUDA
    # autocast), saved by the output gate's multiply; a float32 q would add more
    heads = (T, cfg.num_heads, cfg.head_dim)
    assert saved.get(heads, 0) == len(model.virtual_layers(looping)), f"float32 q or XSA tensors: {saved}"
    # what remains fp32 is small (norm rstd [..., 1]), the loss's [T, V], and XSA's normalized v (fp32 by design,
    # also as the [T, Hkv, 1, D] unit vectors the projection multiplies)
    unit_vectors = {(T, cfg.num_kv_heads, cfg.head_dim), (T, cfg.num_kv_heads, 1, cfg.head_dim)}
    allowed_wide = {(T, cfg.vocab_size), heads, *unit_vectors}
    assert all(shape[-1] == 1 or shape in allowed_wide for shape in saved), saved
    monkeypatch.setattr(F, "rms_norm", real_norm)
    loss.backward()
    assert model.tok_emb.weight.grad.dtype == torch.bfloat16


def test_fp32_path_is_unchanged_by_the_dtype_casts(monkeypatch):
    """Every cast added for the bf16 stream is the identity in fp32: same loss and gradients, bit for bit, as
    with the plain (uncast) norm."""
    import pgolf.model.gpt as gpt

    model = randomized()
    model.looping = True
    ids = packed_row()
    x = torch.randn(5, 64)
    assert rms_norm(x) is not None and torch.equal(rms_norm(x), F.rms_norm(x, (64,)))
    loss, grads = loss_and_grads(model, ids)
    monkeypatch.setattr(gpt, "rms_norm", lambda t: F.rms_norm(t, (t.shape[-1],)))
    loss2, grads2 = loss_and_grads(model, ids)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)


# ------------------------------------------------------------------------------------------- compile warm-up


def test_one_compiled_graph_per_loop_state():
    """The training step (pgolf.train.step.forward_backward marks the cu_seqlens length dynamic) compiles one graph
    per loop state, whatever the segment count and padding (the record: one per padded length and loop state).
    Dynamo's frame count is what decides recompiles; the eager backend keeps the test fast."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from pgolf.train.step import forward_backward, micro_batch_segments

    torch._dynamo.reset()
    cfg = dataclasses.replace(TINY, num_layers=3, xsa_last_n=3, loop_start=1, loop_end=1, parallel_residual_start=2)
    model = GPT(cfg, train_seq_len=SEQ_LEN)
    counter = CompileCounterWithBackend("eager")
    step_model = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for looping, expected in ((False, 1), (True, 2)):
        model.looping = looping
        lengths = set()
        # few segments padded to a power of two (16) or to 64 (the record's padding); many segments (128)
        for bos_every, pad in ((60, "pow2"), (60, "multiple_of_64"), (3, "pow2")):
            ids = torch.randint(2, 300, (192,), generator=g)
            ids[::bos_every] = 1
            cu, max_seqlen = micro_batch_segments(ids, SEQ_LEN, pad)
            lengths.add(cu.numel())
            forward_backward(step_model, ids, torch.roll(ids, -1), cu, max_seqlen, 1, torch.device("cpu"), True)
        assert lengths == {16, 64, 128}
        assert counter.frame_count == expected, f"looping {looping}: {counter.frame_count} graphs"


# ------------------------------------------------------------------------------------- step overheads (S5)


def test_ema_foreach_update_equals_one_multiply_add_per_parameter():
    from pgolf.train.storage import EMA

    model = randomized()
    with torch.no_grad():
        model.tok_emb.weight.data = model.tok_emb.weight.data.bfloat16()  # train.param_storage: record
    ema = EMA(model, 0.9965)
    expected = {n: t.clone() for n, t in ema.shadow.items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        ema.update()
        for name, t in model.state_dict().items():
            expected[name].mul_(0.9965).add_(t, alpha=1.0 - 0.9965)
    assert all(ema.shadow[n].dtype == torch.float32 and torch.equal(ema.shadow[n], t) for n, t in expected.items())
