"""Attention backends chosen by ``model.attention_backend`` (issue 16): resolution, the FA3 stand-in refused, and
FlashAttention 4's custom-op plumbing.

CPU: a reference kernel (per-segment attention, forward with log-sum-exp, backward written out) is registered for
the two FA4 ops, so the contract FA4 must meet is checked without a GPU: schema and fake (shape) functions,
autograd, ``torch.compile(fullgraph=True)`` with a dynamic cu_seqlens length in ONE graph, and a whole model
giving the loss and gradients of the SDPA backend. GPU (``-m gpu``): each installed backend against torch's varlen
kernels and an fp32 reference, outputs and gradients, eager and compiled.
"""

from __future__ import annotations

import importlib.util
import math
import types

import pytest
import torch
import torch.nn.functional as F

import pgolf.model.attention as attn_mod
from pgolf.config import ModelConfig
from pgolf.model import flash4
from pgolf.model.attention import attention, build_cu_seqlens, is_reference_shim, resolve_backend
from pgolf.model.gpt import GPT
from record_oracle import record_script

# the shared reference beside the record script (PGOLF_RECORD_SCRIPT, tests/record_oracle.py)
SHIM = record_script().parent.parent / "shim" / "flash_attn_interface.py"
H, HKV, D = 4, 2, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one CPU thread (tests/conftest.py)


def segments(total: int, seed: int, max_len: int, pad_to: int = 0) -> torch.Tensor:
    """Random segment bounds ending at ``total``, padded with zero-length segments (as the bucketing does)."""
    g = torch.Generator().manual_seed(seed)
    bounds, pos = [0], 0
    while pos < total:
        pos = min(total, pos + int(torch.randint(1, max_len + 1, (1,), generator=g)))
        bounds.append(pos)
    bounds += [total] * max(0, pad_to - len(bounds))
    return torch.tensor(bounds, dtype=torch.int32)


def qkv(T: int, dtype=torch.float32, device="cpu", seed: int = 0, heads=(H, HKV, HKV), dim=D):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, dim, generator=g).to(device=device, dtype=dtype).requires_grad_(True) for h in heads]


# ------------------------------------------------------------------------------- reference kernels for the ops


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _segment_probs(q, k, s, e, causal):
    """softmax scores P [H, L, L] and their log-sum-exp [H, L] for one segment, in (at least) fp32."""
    scores = torch.einsum("thd,shd->hts", q[s:e], _expand_kv(k[s:e], q.shape[1])) / math.sqrt(q.shape[2])
    if causal:
        scores = scores.masked_fill(~torch.ones(e - s, e - s, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1), scores.logsumexp(-1)


def _ref_fwd(q, k, v, cu_seqlens, max_seqlen, causal, k_fwd=None, v_fwd=None):
    if k_fwd is not None:  # what FA4's forward reads: the heads once (native GQA)
        k, v = k_fwd, v_fwd
    wide = torch.promote_types(q.dtype, torch.float32)
    qw, kw, vw = (t.to(wide) for t in (q, k, v))
    out = torch.zeros(q.shape, dtype=wide)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            p, seg_lse = _segment_probs(qw, kw, s, e, causal)
            out[s:e] = torch.einsum("hts,shd->thd", p, _expand_kv(vw[s:e], q.shape[1]))
            lse[:, s:e] = seg_lse.float()
    return out.to(q.dtype), lse


def _ref_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal):
    """Attention backward written out (an op kernel runs below autograd): per segment, P = softmax(c Q K^T),
    dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP * P)), dQ = c dS K, dK = c dS^T Q; query heads of one KV
    group sum into their KV head."""
    wide = torch.promote_types(q.dtype, torch.float32)
    qw, kw, vw, gw = (t.to(wide) for t in (q, k, v, dout))
    heads, group, c = q.shape[1], q.shape[1] // k.shape[1], 1.0 / math.sqrt(q.shape[2])
    dq, dk, dv = torch.zeros_like(qw), torch.zeros_like(kw), torch.zeros_like(vw)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        p, _ = _segment_probs(qw, kw, s, e, causal)  # [H, L, L]
        go = gw[s:e].transpose(0, 1)  # [H, L, D]
        dp = torch.einsum("htd,shd->hts", go, _expand_kv(vw[s:e], heads))
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[s:e] = torch.einsum("hts,shd->thd", ds, _expand_kv(kw[s:e], heads)) * c
        dk[s:e] = (torch.einsum("hts,thd->shd", ds, qw[s:e]) * c).view(e - s, k.shape[1], group, -1).sum(2)
        dv[s:e] = torch.einsum("hts,htd->shd", p, go).view(e - s, k.shape[1], group, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@pytest.fixture(scope="module")
def fa4_on_cpu():
    """The FA4 ops with the reference kernel on CPU, and pgolf's "fa4" backend pointed at them."""
    torch.library.register_kernel("pgolf_fa4::fwd", "cpu", _ref_fwd)
    torch.library.register_kernel("pgolf_fa4::bwd", "cpu", _ref_bwd)
    saved = attn_mod._FA4
    attn_mod._FA4 = flash4.attend
    yield
    attn_mod._FA4 = saved


# ---------------------------------------------------------------------------------------- FA4 op plumbing


def test_fa4_ops_opcheck(fa4_on_cpu):
    """Schema, fake kernels (shapes, strides, dtypes), autograd registration, AOT dispatch (static and dynamic)."""
    T = 60
    cu = segments(T, seed=1, max_len=25, pad_to=8)
    q, k, v = qkv(T)
    torch.library.opcheck(torch.ops.pgolf_fa4.fwd.default, (q, k, v, cu, 25, True))
    out, lse = torch.ops.pgolf_fa4.fwd(q, k, v, cu, 25, True)
    assert out.shape == q.shape and lse.shape == (H, T) and lse.dtype == torch.float32
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu, 25, True)
    torch.library.opcheck(torch.ops.pgolf_fa4.bwd.default, args)
    q, _, v, k_rep, v_rep, once = repeated_heads(T, H // HKV, seed=1, dtype=torch.float32)  # k_fwd, v_fwd given
    torch.library.opcheck(torch.ops.pgolf_fa4.fwd.default, (q, k_rep, v_rep, cu, 25, True, *once))


@pytest.mark.parametrize("causal", [True, False])
def test_fa4_ops_give_the_reference_outputs_and_gradients(fa4_on_cpu, causal):
    T = 70
    cu = segments(T, seed=2, max_len=30, pad_to=12)
    q, k, v = qkv(T, torch.float64, seed=2)
    out = attention(q, k, v, cu, 30, causal=causal, backend="fa4")
    ref = attention(q, k, v, cu, 30, causal=causal, backend="sdpa")
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def repeated_heads(T: int, r: int, seed: int, dtype=torch.float64, device="cpu", heads: int = H, kv_heads: int = HKV,
                   dim: int = D):
    """q [T, heads, dim]; k, v [T, kv_heads, dim]; their heads repeated r times in a row, as train.repeat_kv_heads
    hands them to the attention (leaves); forward_kv: k's heads once as a strided view of the copies, and v."""
    q, k, v = qkv(T, dtype, device, seed=seed, heads=(heads, kv_heads, kv_heads), dim=dim)
    k_rep, v_rep = (x.detach().repeat_interleave(r, dim=1).requires_grad_(True) for x in (k, v))
    return q, k, v, k_rep, v_rep, (k_rep.view(T, kv_heads, r, dim)[:, :, 0], v.detach())


def test_fa4_forward_reads_the_heads_once_and_the_backward_the_copies(fa4_on_cpu):
    """forward_kv: the forward kernel gets the heads once (GQA), the backward the copies; the result and the
    gradients are the attention over the copies, and forward_kv gets none. A forward_kv with other values shows
    that the forward really reads it."""
    T, r = 64, H // HKV
    cu = segments(T, seed=6, max_len=24, pad_to=8)
    q, k, v, k_rep, v_rep, once = repeated_heads(T, r, seed=6)
    out = attention(q, k_rep, v_rep, cu, 24, backend="fa4", forward_kv=once)
    ref = attention(q, k_rep, v_rep, cu, 24, backend="sdpa")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k_rep, v_rep), g), torch.autograd.grad(ref, (q, k_rep, v_rep), g)):
        torch.testing.assert_close(a, b)
    other = (once[0] * 2.0, once[1])  # scaled keys (a constant added to every key leaves a softmax unchanged)
    assert not torch.allclose(attention(q, k_rep, v_rep, cu, 24, backend="fa4", forward_kv=other), ref)
    with pytest.raises(ValueError, match="forward_kv shapes"):
        attention(q, k_rep, v_rep, cu, 24, backend="fa4", forward_kv=(once[0][1:], once[1][1:]))


def test_fa4_forward_kv_compiles_fullgraph(fa4_on_cpu):
    """The heads-once view of the copies passed beside them into the op (inputs that alias) under
    torch.compile(fullgraph=True): no break, the eager values and gradients."""
    T, r = 64, H // HKV
    cu = segments(T, seed=9, max_len=24, pad_to=8)
    q, _, v, k_rep, v_rep, _ = repeated_heads(T, r, seed=9)

    def layer(q, k_rep, v_rep, v, cu):
        once = (k_rep.view(T, HKV, r, D)[:, :, 0], v)
        return (attention(q, k_rep, v_rep, cu, 24, backend="fa4", forward_kv=once) * torch.sigmoid(q)).sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    args = (q, k_rep, v_rep, v.detach(), cu)
    loss_c, loss_e = compiled(*args), layer(*args)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(torch.autograd.grad(loss_c, (q, k_rep, v_rep)), torch.autograd.grad(loss_e, (q, k_rep, v_rep))):
        torch.testing.assert_close(a, b)


def test_fa4_ops_compile_fullgraph_in_one_graph(fa4_on_cpu):
    """fullgraph compile, cu_seqlens length marked dynamic: no break, one graph for two lengths, eager values."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")

    def layer(q, k, v, cu):
        y = attention(F.rms_norm(q, (D,)), k, v, cu, 32, backend="fa4")
        return (y * torch.sigmoid(q)).sum()

    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=False)
    T = 96
    for seed, pad in ((3, 16), (4, 32)):
        cu = segments(T, seed=seed, max_len=32, pad_to=pad)
        torch._dynamo.mark_dynamic(cu, 0)
        q, k, v = qkv(T, seed=seed)
        loss_c = compiled(q, k, v, cu)
        grads_c = torch.autograd.grad(loss_c, (q, k, v))
        loss_e = layer(q, k, v, cu)
        grads_e = torch.autograd.grad(loss_e, (q, k, v))
        torch.testing.assert_close(loss_c, loss_e)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1, f"expected one compiled graph, got {counter.frame_count}"


def test_model_on_fa4_ops_matches_sdpa(fa4_on_cpu):
    cfg = ModelConfig(vocab_size=200, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4,
                      xsa_last_n=3, loop_start=1, loop_end=1, loop_count=2, parallel_residual_start=2)
    torch.manual_seed(0)
    model = GPT(cfg, train_seq_len=16).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.looping = True
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 200, (40,), generator=g)
    ids[0] = ids[11] = 1
    results = {}
    for backend in ("sdpa", "fa4"):
        model.attn_backend = backend
        model.zero_grad(set_to_none=True)
        loss = model(ids, torch.roll(ids, -1))
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(results["fa4"][0], results["sdpa"][0])
    for a, b in zip(results["fa4"][1], results["sdpa"][1]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------- resolution


def test_resolution_on_cpu():
    for requested in ("auto", "torch"):
        choice = resolve_backend(requested, "cpu")
        assert choice.resolved == "sdpa" and choice.requested == requested
        assert set(choice.as_record()) == {"requested", "resolved", "versions", "reason"}
        assert choice.as_record()["versions"]["torch"] == torch.__version__
    for requested in ("fa3", "fa4"):
        with pytest.raises(RuntimeError, match=f"{requested}.*cannot run on cpu"):
            resolve_backend(requested, "cpu")
    with pytest.raises(ValueError, match="model.attention_backend"):
        resolve_backend("flash", "cpu")


@pytest.mark.parametrize(
    "usable, expected",
    [({"fa3", "fa4"}, "fa3"), ({"fa4"}, "fa4"), (set(), "torch_varlen")],
    ids=["fa3-installed", "fa4-only", "neither"],
)
def test_auto_prefers_fa3_then_fa4_then_torch(monkeypatch, usable, expected):
    asked = []

    def status(name, device):
        asked.append(name)
        return "ok" if name in usable or name in ("torch_varlen", "sdpa") else f"{name} missing here"

    monkeypatch.setattr(attn_mod, "_status", status)
    cuda = torch.device("cuda")
    choice = resolve_backend("auto", cuda)
    assert choice.resolved == expected
    assert "fa4" not in asked or "fa3" not in usable  # FA4 is imported only when FA3 cannot run
    if "fa3" not in usable:  # the reason names what was passed over
        assert "fa3: fa3 missing here" in choice.reason
    if not usable:
        assert "fa4: fa4 missing here" in choice.reason
    assert resolve_backend("torch", cuda).resolved == "torch_varlen"
    for name in ("fa3", "fa4"):
        if name in usable:
            assert resolve_backend(name, cuda).resolved == name
        else:
            with pytest.raises(RuntimeError, match=f"{name} missing here"):
                resolve_backend(name, cuda)


def test_model_records_its_backend():
    model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4,
                            xsa_last_n=2, loop_count=1, parallel_residual_start=-1, attention_backend="torch"))
    record = model.set_attention_backend(torch.device("cpu"))
    assert record["requested"] == "torch" and record["resolved"] == "sdpa" == model.attn_backend
    assert model.attention_choice == record


def test_config_rejects_an_unknown_backend():
    from pgolf.config import ConfigError, from_mapping

    with pytest.raises(ConfigError, match="attention_backend"):
        from_mapping(ModelConfig, {"attention_backend": "flash"}, "model")
    assert from_mapping(ModelConfig, {}, "model").attention_backend == "auto"  # older checkpoints: auto


def test_the_reference_stand_in_is_not_flash_attention_3(monkeypatch):
    fake = types.ModuleType("flash_attn_interface", "Stand-in for FlashAttention-3's Python interface ...")
    fake.flash_attn_varlen_func = lambda *a, **k: None
    assert is_reference_shim(fake)
    monkeypatch.setitem(__import__("sys").modules, "flash_attn_interface", fake)
    fn, why = attn_mod._import_fa3()
    assert fn is None and "stand-in" in why
    real = types.ModuleType("flash_attn_interface", "FlashAttention-3 interface")
    real.flash_attn_varlen_func = lambda *a, **k: None
    monkeypatch.setitem(__import__("sys").modules, "flash_attn_interface", real)
    assert not is_reference_shim(real) and attn_mod._import_fa3() == (real.flash_attn_varlen_func, "ok")


def test_the_shared_shim_file_is_recognised():
    if not SHIM.is_file():
        pytest.skip(f"shared reference shim not found at {SHIM}")
    spec = importlib.util.spec_from_file_location("pgolf_test_shim_copy", SHIM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # FA3_SHIM unset: dense mode, registers nothing
    assert is_reference_shim(module)


# ------------------------------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _run_backend(backend, q, k, v, cu, grad, compiled=False):
    def fn(q, k, v, cu):
        return attention(q, k, v, cu, 2048, backend=backend)

    if compiled:
        torch._dynamo.mark_dynamic(cu, 0)
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    out = fn(q, k, v, cu)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["fa3", "fa4"])
def test_gpu_backend_matches_torch_varlen(backend, compiled):
    """Record shapes (8 query heads, 4 KV heads, head dim 64, bf16), random segments up to 2,048 tokens plus
    zero-length trailing segments: outputs and gradients against torch's varlen kernels and an fp32 reference."""
    try:
        resolve_backend(backend, "cuda")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    T = 8192
    cu = segments(T, seed=7, max_len=2048, pad_to=32).cuda()
    q, k, v = qkv(T, torch.bfloat16, "cuda", seed=7, heads=(8, 4, 4), dim=64)
    grad = torch.randn_like(q)
    got = _run_backend(backend, q, k, v, cu, grad, compiled)
    fallback = _run_backend("torch_varlen", q, k, v, cu, grad)
    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    truth = _run_backend("sdpa", *leaves, cu, grad.float())
    for name, a, b, t in zip(("out", "dq", "dk", "dv"), got, fallback, truth):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err, err_fallback = ((x.float() - t).norm() / t.norm() for x in (a, b))
        assert err <= 1.5 * err_fallback + 2e-3, f"{backend} {name}: relative error {err:.2e} vs {err_fallback:.2e}"
        assert (a.float() - b.float()).abs().max() < (0.05 if name == "out" else 0.25), name


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_fa4_forward_on_the_heads_once_matches_the_copies(compiled):
    """train.repeat_kv_heads with FA4: the forward on the heads once (GQA, a strided view of the copies) against the
    forward on the copies (record shapes, bf16): the same attention, so the outputs agree to rounding and the
    backward, which reads the copies in both, gets the same gradients within that rounding's reach."""
    try:
        resolve_backend("fa4", "cuda")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    T, heads, kv_heads, dim = 8192, 8, 4, 64
    r = heads // kv_heads
    cu = segments(T, seed=8, max_len=2048, pad_to=32).cuda()
    q, _, _, k_rep, v_rep, once = repeated_heads(T, r, seed=8, dtype=torch.bfloat16, device="cuda", heads=heads,
                                                 kv_heads=kv_heads, dim=dim)
    grad = torch.randn_like(q)

    def run(forward_kv):
        def fn(q, k, v, cu):
            return attention(q, k, v, cu, 2048, backend="fa4", forward_kv=forward_kv)

        if compiled:
            torch._dynamo.mark_dynamic(cu, 0)
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        out = fn(q, k_rep, v_rep, cu)
        return (out, *torch.autograd.grad(out, (q, k_rep, v_rep), grad))

    for name, a, b in zip(("out", "dq", "dk", "dv"), run(once), run(None)):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape and torch.isfinite(a).all(), name
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < 5e-3, f"{name}: relative difference {err:.2e}"


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_picks_the_fastest_installed():
    choice = resolve_backend("auto", "cuda")
    usable = attn_mod.available_backends("cuda")
    assert choice.resolved == usable[0] and choice.resolved in ("fa3", "fa4", "torch_varlen")
    assert resolve_backend("torch", "cuda").resolved == "torch_varlen"
