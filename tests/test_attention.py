"""Packed varlen attention: segment bookkeeping and every backend against a naive per-segment reference."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.model.attention import (
    attention,
    available_backends,
    build_cu_seqlens,
    check_cu_seqlens,
    pad_cu_seqlens,
    segment_ids,
    segment_positions,
    select_backend,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one CPU thread (tests/conftest.py)


# ------------------------------------------------------------------------------------------- references


def reference_cu_seqlens(ids: list[int], bos_id: int, max_seqlen: int) -> list[int]:
    """Segment starts by walking the tokens one by one."""
    starts, offset = [], 0
    for t, token in enumerate(ids):
        if t == 0 or token == bos_id:
            offset = 0
        if offset % max_seqlen == 0:
            starts.append(t)
        offset += 1
    return starts + [len(ids)]


def reference_attention(q, k, v, cu_seqlens, causal=True):
    """Per segment, per head, explicit softmax in float64."""
    q, k, v = q.double(), k.double(), v.double()
    T, H, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n == 0:
            continue
        for h in range(H):
            scores = q[start:end, h] @ k[start:end, h // group].T / math.sqrt(D)
            if causal:
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            out[start:end, h] = torch.softmax(scores, dim=-1) @ v[start:end, h // group]
    return out


def random_row(num_tokens: int, bos_every: float, seed: int, bos_id: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 50, (num_tokens,), generator=g)
    ids[torch.rand(num_tokens, generator=g) < bos_every] = bos_id
    return ids


# ------------------------------------------------------------------------------------ segment bookkeeping


def test_build_cu_seqlens_example():
    ids = torch.tensor([1, 5, 6, 7, 8, 9, 1, 4, 1, 1, 3])
    cu, bound = build_cu_seqlens(ids, bos_id=1, max_seqlen=3)
    # docs at 0, 6, 8, 9; the first doc (6 tokens) is cut at 3
    assert cu.tolist() == [0, 3, 6, 8, 9, 11]
    assert cu.dtype == torch.int32 and bound == 3


def test_build_cu_seqlens_row_starting_mid_document():
    ids = torch.tensor([7, 7, 7, 7, 7, 1, 7])
    cu, _ = build_cu_seqlens(ids, bos_id=1, max_seqlen=2)
    assert cu.tolist() == [0, 2, 4, 5, 7]


@pytest.mark.parametrize("max_seqlen", [1, 3, 8, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_build_cu_seqlens_matches_reference(max_seqlen, seed):
    ids = random_row(200, bos_every=0.05, seed=seed)
    cu, _ = build_cu_seqlens(ids, bos_id=1, max_seqlen=max_seqlen)
    assert cu.tolist() == reference_cu_seqlens(ids.tolist(), 1, max_seqlen)
    check_cu_seqlens(cu, ids.numel(), max_seqlen)


def test_build_cu_seqlens_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        build_cu_seqlens(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seqlen"):
        build_cu_seqlens(torch.ones(3, dtype=torch.long), max_seqlen=0)


def test_segment_positions_with_zero_length_segments():
    # zero-length segments in the middle (repeated 4) and as padding at the end (repeated 9)
    cu = torch.tensor([0, 4, 4, 6, 9, 9, 9], dtype=torch.int32)
    assert segment_positions(cu, 9).tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert segment_ids(cu, 9).tolist() == [0, 0, 0, 0, 2, 2, 3, 3, 3]


def test_segment_positions_match_loop():
    ids = random_row(150, bos_every=0.08, seed=5)
    cu, _ = build_cu_seqlens(ids, max_seqlen=7)
    expected = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        expected += list(range(end - start))
    assert segment_positions(pad_cu_seqlens(cu, cu.numel() + 5), ids.numel()).tolist() == expected


def test_pad_cu_seqlens():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert pad_cu_seqlens(cu, 6).tolist() == [0, 2, 5, 5, 5, 5]
    assert pad_cu_seqlens(cu, 3) is cu
    with pytest.raises(ValueError, match="more than"):
        pad_cu_seqlens(cu, 2)


@pytest.mark.parametrize(
    "cu, message",
    [
        ([1, 4], "first entry"),
        ([0, 3], "last entry"),
        ([0, 3, 2, 4], "non-decreasing"),
        ([0, 4], "more than max_seqlen"),
    ],
)
def test_check_cu_seqlens_errors(cu, message):
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens(torch.tensor(cu, dtype=torch.int32), 4, max_seqlen=3)


# --------------------------------------------------------------------------------------------- backends


def test_cpu_selects_sdpa():
    assert select_backend("cpu") == "sdpa"
    assert available_backends("cpu") == ["sdpa"]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("max_seqlen", [5, 8, 64])
def test_sdpa_matches_reference(heads, kv_heads, causal, max_seqlen):
    ids = random_row(37, bos_every=0.15, seed=heads * 10 + kv_heads)  # 37: not a multiple of any block size
    cu, _ = build_cu_seqlens(ids, max_seqlen=max_seqlen)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(37, heads, 8, generator=g)
    k = torch.randn(37, kv_heads, 8, generator=g)
    v = torch.randn(37, kv_heads, 8, generator=g)
    y = attention(q, k, v, cu, max_seqlen, causal=causal, backend="sdpa")
    assert y.shape == q.shape and y.dtype == q.dtype
    torch.testing.assert_close(y.double(), reference_attention(q, k, v, cu, causal), atol=1e-5, rtol=1e-5)


def test_sdpa_zero_length_padding_changes_nothing():
    ids = random_row(40, bos_every=0.1, seed=3)
    cu, max_seqlen = build_cu_seqlens(ids, max_seqlen=9)
    # insert a zero-length segment in the middle and pad the end
    inner = torch.cat([cu[:2], cu[1:2], cu[2:]])
    padded = pad_cu_seqlens(inner, inner.numel() + 7)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(40, 4, 8, generator=g), torch.randn(40, 2, 8, generator=g), torch.randn(40, 2, 8, generator=g)
    y_plain = attention(q, k, v, cu, max_seqlen, backend="sdpa")
    y_padded = attention(q, k, v, padded, max_seqlen, backend="sdpa")
    torch.testing.assert_close(y_padded, y_plain, atol=0, rtol=0)
    torch.testing.assert_close(y_padded.double(), reference_attention(q, k, v, cu), atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_match_reference():
    ids = random_row(30, bos_every=0.1, seed=8)
    cu, max_seqlen = build_cu_seqlens(ids, max_seqlen=7)
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(30, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2)]
    grads = []
    for fn in (lambda q, k, v: attention(q, k, v, cu, max_seqlen, backend="sdpa"), lambda q, k, v: reference_attention(q, k, v, cu)):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        (fn(*leaves) * torch.linspace(-1, 1, 30 * 4 * 8, dtype=torch.float64).view(30, 4, 8)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_segments_do_not_see_each_other():
    """Changing a token's K/V in one segment leaves every other segment's output unchanged."""
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(20, 2, 4, generator=g), torch.randn(20, 1, 4, generator=g), torch.randn(20, 1, 4, generator=g)
    y = attention(q, k, v, cu, 8, backend="sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[7] += 3.0
    v2[7] -= 3.0
    y2 = attention(q, k2, v2, cu, 8, backend="sdpa")
    assert torch.equal(y2[:5], y[:5]) and torch.equal(y2[12:], y[12:])
    assert torch.equal(y2[5:7], y[5:7])  # causal: earlier tokens of the same segment
    assert not torch.allclose(y2[7:12], y[7:12])


def test_attention_rejects_bad_shapes_and_backend():
    cu = torch.tensor([0, 4], dtype=torch.int32)
    q = torch.randn(4, 4, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        attention(q, torch.randn(4, 3, 8), torch.randn(4, 3, 8), cu, 4)
    with pytest.raises(ValueError, match="do not match"):
        attention(q, torch.randn(5, 2, 8), torch.randn(5, 2, 8), cu, 4)
    with pytest.raises(ValueError, match="expected q"):
        attention(q[None], torch.randn(4, 2, 8), torch.randn(4, 2, 8), cu, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        attention(q, torch.randn(4, 2, 8), torch.randn(4, 2, 8), cu, 4, backend="flash9")
    with pytest.raises(ValueError, match="last entry"):
        attention(q, torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.tensor([0, 3], dtype=torch.int32), 4)


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["fa3", "fa4", "torch_varlen", "sdpa"])
def test_gpu_backends_agree_in_bf16(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available here")
    device = torch.device("cuda")
    ids = random_row(3000, bos_every=0.002, seed=11).to(device)
    cu, max_seqlen = build_cu_seqlens(ids, max_seqlen=1024)
    cu = pad_cu_seqlens(cu, cu.numel() + 3)  # zero-length tail segments, as the compiled trainer uses
    g = torch.Generator(device=device).manual_seed(0)
    tensors = [torch.randn(3000, h, 64, generator=g, device=device) for h in (8, 4, 4)]
    ref_leaves = [t.clone().requires_grad_(True) for t in tensors]
    ref = attention(*ref_leaves, cu, max_seqlen, backend="sdpa")  # fp32 banded SDPA as the reference
    weights = torch.randn(ref.shape, generator=g, device=device)
    (ref * weights).sum().backward()
    leaves = [t.to(torch.bfloat16).requires_grad_(True) for t in tensors]
    y = attention(*leaves, cu, max_seqlen, backend=backend)
    (y.float() * weights).sum().backward()
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=6e-2, rtol=6e-2)


# ------------------------------------------------------------- torch varlen keyword adaptation (no GPU needed)


def _fake_varlen_211(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's keyword set: no is_causal, no enable_gqa (so K/V must arrive with every query head)."""
    assert k.shape[1] == q.shape[1], "GQA heads must be repeated before calling torch 2.11 varlen_attn"
    assert window_size in ((-1, -1), (-1, 0))
    return reference_attention(q, k, v, cu_seq_q, causal=window_size == (-1, 0)).to(q.dtype)


def _fake_varlen_213(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch 2.13's keyword set: enable_gqa exists, so K/V keep their own head count."""
    assert enable_gqa == (k.shape[1] != q.shape[1])
    return reference_attention(q, k, v, cu_seq_q, causal=window_size == (-1, 0)).to(q.dtype)


@pytest.mark.parametrize("fake", [_fake_varlen_211, _fake_varlen_213])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_varlen_keywords_follow_the_signature(monkeypatch, fake, causal):
    import inspect

    import pgolf.model.attention as attn_mod

    monkeypatch.setattr(attn_mod, "_TORCH_VARLEN_FN", fake)
    monkeypatch.setattr(attn_mod, "_TORCH_VARLEN_KEYWORDS", frozenset(inspect.signature(fake).parameters))
    cu = torch.tensor([0, 6, 6, 13, 20, 20], dtype=torch.int32)
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(20, 4, 8, generator=g), torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    y = attention(q, k, v, cu, 8, causal=causal, backend="torch_varlen")
    torch.testing.assert_close(y, attention(q, k, v, cu, 8, causal=causal, backend="sdpa"), atol=1e-5, rtol=1e-5)
