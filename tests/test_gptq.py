"""GPTQ, SDClip, LQER, bit packing and role routing on small CPU tensors with real (X^T X / n) Hessians."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgolf.config import QuantizeConfig
from pgolf.quantize.gptq import QuantizeError, dequantize, gptq_quantize_weight, layer_output_error, max_level, rtn_quantize, sdclip_scales
from pgolf.quantize.lqer import lqer_correction, lqer_reconstruct, pack_int2, pack_int4, unpack_int2, unpack_int4
from pgolf.quantize.weights import dequantize_state, quantize_state


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Activations with correlated features and uneven per-feature scales: X [n, cols]."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g)  # [cols, cols]
    feature_scale = torch.rand(cols, generator=g) * 2 + 0.1  # [cols]
    return torch.randn(n, cols, generator=g) @ mixing * feature_scale


def hessian(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]  # [cols, cols]


def layer(rows: int, cols: int, seed: int, n: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    X = correlated_inputs(n, cols, seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    return W, hessian(X), X


# ------------------------------------------------------------------------------------------- scales and RTN


@pytest.mark.parametrize("correction", [1, 0])  # sdclip_std: unbiased (the default, the record's), population
def test_sdclip_scales_formula_and_fp16_storage(correction):
    W, _, _ = layer(16, 40, 0)
    scale = sdclip_scales(W, bits=6, clip_sigmas=13.0, correction=correction)
    assert scale.dtype == torch.float16 and scale.shape == (16,)
    expected = 13.0 * W.std(dim=1, correction=correction) / 31
    torch.testing.assert_close(scale.float(), expected, rtol=1e-3, atol=0)
    if correction == 1:
        assert torch.equal(scale, sdclip_scales(W, bits=6, clip_sigmas=13.0))


def test_sdclip_guards_zero_and_constant_rows():
    W = torch.randn(3, 8)
    W[1] = 0.0
    W[2] = 0.25  # constant row: std 0
    scale = sdclip_scales(W, bits=6, clip_sigmas=13.0)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    q = rtn_quantize(W, scale, 6)
    assert bool((q[1] == 0).all())
    torch.testing.assert_close(dequantize(q, scale)[2], W[2])  # constant row stays exact


def test_symmetric_integer_range():
    assert max_level(6) == 31 and max_level(8) == 127 and max_level(2) == 1
    W = torch.randn(8, 64) * 5
    W[0, 0] = 1e3  # far beyond the clip
    scale = sdclip_scales(W, bits=4, clip_sigmas=2.0)
    q = rtn_quantize(W, scale, 4)
    assert q.dtype == torch.int8
    assert int(q.min()) >= -7 and int(q.max()) <= 7 and int(q[0, 0]) == 7
    with pytest.raises(QuantizeError, match="bits"):
        max_level(9)


def test_layer_output_error_equals_activation_error():
    W, H, X = layer(12, 24, 1)
    W_hat = W + torch.randn_like(W) * 1e-3
    direct = float(((X.double() @ (W - W_hat).double().T) ** 2).sum() / X.shape[0])
    assert layer_output_error(W, W_hat, H) == pytest.approx(direct, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,clip", [(6, 13.0), (4, 3.0)])
def test_gptq_beats_rtn_at_the_same_scales(seed, bits, clip):
    W, H, _ = layer(48, 96, seed)
    q, scale = gptq_quantize_weight(W, H, bits, clip, block_size=32)
    torch.testing.assert_close(scale, sdclip_scales(W, bits, clip), rtol=0, atol=0)
    assert q.dtype == torch.int8 and q.shape == W.shape
    assert int(q.abs().max()) <= max_level(bits)
    rtn_err = layer_output_error(W, dequantize(rtn_quantize(W, scale, bits), scale), H)
    gptq_err = layer_output_error(W, dequantize(q, scale), H)
    assert gptq_err < 0.8 * rtn_err  # correlated inputs: error feedback pays off clearly


def test_gptq_lazy_blocks_equal_unblocked():
    W, H, _ = layer(20, 50, 3)
    results = [
        gptq_quantize_weight(W, H, 4, 3.0, block_size=b, compute_dtype=torch.float64)[0] for b in (1, 7, 16, 1000)
    ]
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_gptq_with_uncorrelated_inputs_is_rtn():
    """A diagonal Hessian gives no error feedback between columns, so GPTQ must reduce to RTN."""
    W, _, _ = layer(16, 32, 4)
    H = torch.diag(torch.rand(32) + 0.5)
    for act_order in (True, False):
        q, scale = gptq_quantize_weight(W, H, 5, 4.0, block_size=8, act_order=act_order)
        assert torch.equal(q, rtn_quantize(W, scale, 5))


def test_gptq_act_order_off_also_beats_rtn():
    W, H, _ = layer(32, 64, 5)
    q, scale = gptq_quantize_weight(W, H, 4, 3.0, act_order=False)
    rtn_err = layer_output_error(W, dequantize(rtn_quantize(W, scale, 4), scale), H)
    assert layer_output_error(W, dequantize(q, scale), H) < rtn_err


def test_gptq_dead_columns():
    W, _, X = layer(16, 32, 6)
    X[:, [3, 17]] = 0.0  # features that never fire
    H = hessian(X)
    q, scale = gptq_quantize_weight(W, H, 6, 13.0, block_size=8)
    assert bool(torch.isfinite(dequantize(q, scale)).all())
    rtn = rtn_quantize(W, scale, 6)
    assert torch.equal(q[:, 3], rtn[:, 3]) and torch.equal(q[:, 17], rtn[:, 17])
    # gptq_dead_columns: zero (the record's): dead columns get code 0; the live columns see the same problem
    qz, scale_z = gptq_quantize_weight(W, H, 6, 13.0, block_size=8, dead_columns="zero")
    assert torch.equal(scale_z, scale) and not bool(qz[:, [3, 17]].any())
    live = [c for c in range(32) if c not in (3, 17)]
    assert torch.equal(qz[:, live], q[:, live])  # no feedback flows from or to a dead column either way


def test_gptq_rank_deficient_hessian_without_damping():
    W, _, _ = layer(8, 32, 7)
    X = correlated_inputs(8, 32, 7)  # 8 samples: H has rank 8 of 32
    q, scale = gptq_quantize_weight(W, hessian(X), 6, 13.0, damp=0.0)
    assert bool(torch.isfinite(dequantize(q, scale)).all())


def test_gptq_rejects_bad_inputs():
    W, H, _ = layer(8, 16, 8)
    with pytest.raises(QuantizeError, match=r"Hessian shape \(8, 8\), expected \[16, 16\]"):
        gptq_quantize_weight(W, H[:8, :8], 6, 13.0)
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(QuantizeError, match="NaN"):
        gptq_quantize_weight(W, bad, 6, 13.0)
    with pytest.raises(QuantizeError, match="2-D"):
        gptq_quantize_weight(W[0], H, 6, 13.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_cuda_matches_cpu():
    W, H, _ = layer(64, 128, 9)
    q_cpu, s_cpu = gptq_quantize_weight(W, H, 6, 13.0, compute_dtype=torch.float64)
    q_gpu, s_gpu = gptq_quantize_weight(W.cuda(), H.cuda(), 6, 13.0, compute_dtype=torch.float64)
    assert torch.equal(s_cpu, s_gpu.cpu())
    assert (q_cpu != q_gpu.cpu()).float().mean() < 0.001  # only rounding ties may differ


# ---------------------------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("numel", [0, 1, 3, 4, 5, 17, 64])
def test_int2_and_int4_packing_round_trip(numel):
    g = torch.Generator().manual_seed(numel)
    c2 = torch.randint(0, 4, (numel,), generator=g, dtype=torch.uint8)
    c4 = torch.randint(0, 16, (numel,), generator=g, dtype=torch.uint8)
    p2, p4 = pack_int2(c2), pack_int4(c4)
    assert p2.dtype == torch.uint8 and p2.numel() == (numel + 3) // 4
    assert p4.dtype == torch.uint8 and p4.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int2(p2, numel), c2)
    assert torch.equal(unpack_int4(p4, numel), c4)


def test_packing_layout_and_range_errors():
    assert pack_int2(torch.tensor([1, 2, 3, 0])).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_int4(torch.tensor([0xA, 0x5])).tolist() == [0x5A]
    with pytest.raises(QuantizeError, match=r"\[0, 3\]"):
        pack_int2(torch.tensor([4]))
    with pytest.raises(QuantizeError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([-1]))
    with pytest.raises(QuantizeError, match="cannot hold"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 9)


# ---------------------------------------------------------------------------------------------------- LQER


@pytest.mark.parametrize("mode", ["asym_search", "sym"])
def test_lqer_reconstructs_a_low_rank_error(mode):
    g = torch.Generator().manual_seed(11)
    low_rank = torch.randn(40, 3, generator=g) @ torch.randn(3, 70, generator=g)  # [40, 70], rank 3
    E = low_rank + 0.01 * torch.randn(40, 70, generator=g)
    factors = lqer_correction(E, rank=4, mode=mode, group_size=16)
    assert factors.a_codes.dtype == torch.uint8 and factors.b_codes.dtype == torch.uint8
    assert factors.b_scales.dtype == torch.float16 and factors.b_scales.shape == (4, 5)
    if mode == "asym_search":
        assert factors.mode == "asym" and factors.a_scales.shape == (1,)
        assert factors.a_codes.numel() == (40 * 4 + 3) // 4
    E_hat = lqer_reconstruct(factors)
    assert E_hat.shape == E.shape
    assert float(((E - E_hat) ** 2).sum()) < 0.5 * float((E**2).sum())


@pytest.mark.parametrize("mode", ["asym_search", "sym"])
def test_lqer_lowers_gptq_output_error(mode):
    W, H, _ = layer(48, 96, 12)
    q, scale = gptq_quantize_weight(W, H, 3, 2.5)
    W_hat = dequantize(q, scale)
    gptq_err = layer_output_error(W, W_hat, H)
    factors = lqer_correction(W - W_hat, rank=16, mode=mode, group_size=16)
    assert layer_output_error(W, W_hat + lqer_reconstruct(factors), H) < gptq_err


def test_lqer_rejects_unknown_mode():
    with pytest.raises(QuantizeError, match="asym"):
        lqer_correction(torch.randn(4, 4), 2, "fancy", 4)


# -------------------------------------------------------------------------------------- whole-model routing


def tiny_model(seed: int = 0):
    """A state dict covering every role, plus Hessians for the GPTQ-routed matrices."""
    g = torch.Generator().manual_seed(seed)
    shapes_roles = {
        "tok_emb.weight": ((64, 32), "embedding"),
        "blocks.0.attn.qkv.weight": ((64, 32), "attn"),
        "blocks.0.attn.proj.weight": ((32, 32), "attn"),
        "blocks.0.mlp.up.weight": ((96, 32), "mlp"),
        "blocks.0.mlp.down.weight": ((32, 96), "mlp"),
        "blocks.0.attn.gate.weight": ((4, 12), "attn_gate"),
        "smear.gate.weight": ((1, 12), "gate"),
        "blocks.0.attn_scale": ((32,), "scalar"),
        "lm_head.weight": ((64, 32), "head"),
    }
    state = {n: torch.randn(*s, generator=g) * 0.05 for n, (s, _) in shapes_roles.items()}
    roles = {n: r for n, (_, r) in shapes_roles.items()}
    hessians = {
        n: hessian(correlated_inputs(512, s[1], seed + i))
        for i, (n, (s, r)) in enumerate(shapes_roles.items())
        if r in ("embedding", "attn", "mlp", "head")
    }
    return state, roles, hessians


def test_quantize_state_routes_by_role():
    state, roles, hessians = tiny_model()
    cfg = QuantizeConfig(lqer_mode="off", passthrough_max_elements=64)
    qm = quantize_state(state, roles, hessians, cfg)
    report = {r["name"]: r for r in qm.report}
    expected = {
        "tok_emb.weight": ("gptq", 7, 14.0),
        "lm_head.weight": ("gptq", 7, 14.0),
        "blocks.0.attn.qkv.weight": ("gptq", 6, 13.0),
        "blocks.0.attn.proj.weight": ("gptq", 6, 13.0),  # 1,024 elements > 64: size never demotes a matrix
        "blocks.0.mlp.up.weight": ("gptq", 6, 11.5),
        "blocks.0.mlp.down.weight": ("gptq", 6, 11.5),
        "blocks.0.attn.gate.weight": ("rtn", 8, None),
        "smear.gate.weight": ("fp16", 16, None),
        "blocks.0.attn_scale": ("fp16", 16, None),
    }
    for name, (method, bits, clip) in expected.items():
        qt = qm.tensors[name]
        assert (qt.method, qt.bits, qt.clip_sigmas) == (method, bits, clip), name
        assert (report[name]["method"], report[name]["bits"]) == (method, bits)
    gate = qm.tensors["blocks.0.attn.gate.weight"]
    assert gate.q.dtype == torch.int8 and int(gate.q.abs().max()) == 127  # absmax per row reaches the top code
    assert qm.tensors["blocks.0.attn_scale"].data.dtype == torch.float16
    for name, r in report.items():
        if r["method"] == "gptq":
            assert r["gptq_error"] <= r["rtn_error"] and 0 < r["gptq_rel_error"] < 1
        else:
            assert r["gptq_error"] is None and r["weight_rel_error"] < 1e-2

    deq = dequantize_state(qm)
    assert set(deq) == set(state)
    for name, W in state.items():
        assert deq[name].shape == W.shape and deq[name].dtype == torch.float32
        rel = float(((deq[name] - W) ** 2).sum()) / float((W**2).sum())
        assert rel == pytest.approx(report[name]["weight_rel_error"], rel=1e-4), name
        assert rel < 0.25, name  # GPTQ trades weight error for output error, but stays close
        if report[name]["method"] == "gptq":
            out_err = layer_output_error(W, deq[name], hessians[name])
            assert out_err == pytest.approx(report[name]["gptq_error"], rel=1e-4), name
    assert dequantize_state(qm, torch.bfloat16)["tok_emb.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["asym_search", "sym"])
def test_quantize_state_lqer_on_top_k(mode):
    state, roles, hessians = tiny_model(1)
    cfg = QuantizeConfig(attn_bits=3, mlp_bits=3, embed_bits=3, attn_clip_sigmas=2.5, mlp_clip_sigmas=2.5,
                         embed_clip_sigmas=2.5, lqer_mode=mode, lqer_top_k=2, lqer_rank=8, lqer_group_size=16)
    qm = quantize_state(state, roles, hessians, cfg)
    gptq_reports = sorted((r for r in qm.report if r["method"] == "gptq"), key=lambda r: -r["gptq_error"])
    top = {r["name"] for r in gptq_reports[:2]}
    assert {r["name"] for r in qm.report if r["lqer_error"] is not None} == top
    applied = [r for r in qm.report if r["lqer_applied"]]
    assert applied, "LQER should help at least one of the worst tensors"
    for r in applied:
        assert r["lqer_error"] < r["gptq_error"]
        assert qm.tensors[r["name"]].lqer is not None
    # the dequantized state includes the correction: its output error is the reported LQER error
    deq = dequantize_state(qm)
    for r in applied:
        name = r["name"]
        assert layer_output_error(state[name], deq[name], hessians[name]) == pytest.approx(r["lqer_error"], rel=1e-4)


def test_quantize_state_refusals():
    state, roles, hessians = tiny_model()
    cfg = QuantizeConfig(lqer_mode="off")
    missing = dict(hessians)
    del missing["blocks.0.mlp.down.weight"]
    with pytest.raises(QuantizeError, match=r"blocks\.0\.mlp\.down\.weight: no Hessian"):
        quantize_state(state, roles, missing, cfg)
    wrong = dict(hessians, **{"blocks.0.mlp.down.weight": torch.eye(32)})
    with pytest.raises(QuantizeError, match=r"Hessian shape \(32, 32\), expected \[96, 96\]"):
        quantize_state(state, roles, wrong, cfg)
    with pytest.raises(QuantizeError, match="unknown role 'bias'"):
        quantize_state(state, dict(roles, **{"blocks.0.attn_scale": "bias"}), hessians, cfg)
    with pytest.raises(QuantizeError, match="no role for extra"):
        quantize_state(dict(state, extra=torch.zeros(2)), roles, hessians, cfg)
    with pytest.raises(QuantizeError, match="no quantization route"):
        quantize_state(state, roles, hessians, dataclasses.replace(cfg, passthrough_max_elements=16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantize_state_on_cuda_matches_cpu():
    state, roles, hessians = tiny_model(2)
    cfg = QuantizeConfig(lqer_top_k=2, lqer_rank=4, lqer_group_size=16)
    cpu = quantize_state(state, roles, hessians, cfg)
    gpu = quantize_state({n: t.cuda() for n, t in state.items()}, roles, {n: h.cuda() for n, h in hessians.items()}, cfg)
    for name, qt in cpu.tensors.items():
        other = gpu.tensors[name]
        assert other.method == qt.method and (other.q is None or other.q.device.type == "cpu")
    deq_cpu, deq_gpu = dequantize_state(cpu), dequantize_state(gpu)
    for name in deq_cpu:
        rel = float(((deq_cpu[name] - deq_gpu[name]) ** 2).sum()) / max(float((deq_cpu[name] ** 2).sum()), 1e-30)
        assert rel < 1e-3, name  # float32 GPTQ may round a few ties differently


# ------------------------------------------------------------------- the record's options (quantize section)


def test_record_routing_small_matrices_and_gate_window():
    """small_matrix_passthrough: the size rule first for every tensor; the gate is int8 only inside its window."""
    state, roles, hessians = tiny_model()
    cfg = QuantizeConfig(lqer_mode="off", passthrough_max_elements=1024, small_matrix_passthrough=True,
                         gate_min_elements=32, gate_max_elements=8192)
    qm = quantize_state(state, roles, hessians, cfg)
    methods = {n: qt.method for n, qt in qm.tensors.items()}
    assert methods["blocks.0.attn.proj.weight"] == "fp16"  # 1,024 elements
    assert methods["tok_emb.weight"] == methods["blocks.0.mlp.up.weight"] == "gptq"  # 2,048 / 3,072 elements
    assert methods["blocks.0.attn.gate.weight"] == "rtn"  # 48 elements: inside the window
    narrow = dataclasses.replace(cfg, gate_min_elements=64)
    assert quantize_state(state, roles, hessians, narrow).tensors["blocks.0.attn.gate.weight"].method == "fp16"
    with pytest.raises(Exception, match="gate_max_elements"):
        QuantizeConfig(gate_min_elements=64, gate_max_elements=32)


def test_lqer_record_codebook_layouts():
    g = torch.Generator().manual_seed(13)
    E = torch.randn(48, 64, generator=g) * 0.01
    f = lqer_correction(E, rank=4, mode="asym", group_size=32)
    assert f.mode == "asym" and f.a_scales.shape == (1,) and f.b_scales.shape == (4, 2)
    a = unpack_int2(f.a_codes, 48 * 4).to(torch.int16) - 2
    b = unpack_int4(f.b_codes, 4 * 64).to(torch.int16) - 8
    assert -2 <= int(a.min()) and int(a.max()) <= 1 and -8 <= int(b.min()) and int(b.max()) <= 7
    assert int(b.min()) == -8 or int(b.max()) == 7  # the group max maps to +-7.5: -8 or the clamped 7
    # rank * cols not a multiple of the group: the record's per-row int4 fallback, layout rowsym
    f2 = lqer_correction(E[:, :50], rank=3, mode="asym", group_size=32)
    assert f2.mode == "rowsym" and f2.a_scales.shape == (48,) and f2.b_scales.shape == (3,)
    assert float(((E[:, :50] - lqer_reconstruct(f2)) ** 2).sum()) < float((E[:, :50] ** 2).sum())
    with pytest.raises(QuantizeError, match="not a multiple of lqer_group_size"):
        lqer_correction(E[:, :48], rank=4, mode="asym", group_size=32)  # 4 * 48 % 32 == 0 but 48 % 32 != 0



def test_lqer_record_codebook_refuses_a_scale_past_float16():
    """The record's float16 casts are kept (its factors bit for bit), but an inf scale would dequantize the whole
    layer to NaN inside a valid-looking artifact: refused, naming the tensor."""
    E = torch.zeros(64, 64)
    E[3, 5] = 1e6  # max|A| / 1.5 and / 7 > 65504
    for cols in (64, 50):  # the record's layout and its per-row fallback
        with pytest.raises(QuantizeError, match="factor scale is inf in float16"):
            lqer_correction(E[:, :cols], rank=4, mode="asym", group_size=32)
    assert torch.isfinite(lqer_correction(E, rank=4, mode="asym_search", group_size=32).a_scales).all()
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 1e6
    X = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    cfg = QuantizeConfig(lqer_mode="asym", lqer_keep_if_better=False, lqer_top_k=1)
    with pytest.raises(QuantizeError, match="^w: lqer_mode asym: a factor scale"):
        quantize_state({"w": W}, {"w": "attn"}, {"w": X.T @ X / 256}, cfg)

def test_lqer_selection_by_weight_error_without_keep_check():
    state, roles, hessians = tiny_model(1)
    base = QuantizeConfig(attn_bits=3, mlp_bits=3, embed_bits=3, attn_clip_sigmas=2.5, mlp_clip_sigmas=2.5,
                          embed_clip_sigmas=2.5, lqer_mode="asym", lqer_top_k=2, lqer_rank=2, lqer_group_size=16,
                          lqer_rank_by="weight_fro", lqer_keep_if_better=False)
    qm = quantize_state(state, roles, hessians, base)
    fro = {}
    for r in qm.report:
        if r["method"] == "gptq":
            qt = qm.tensors[r["name"]]
            fro[r["name"]] = float((state[r["name"]] - dequantize(qt.q, qt.scale)).norm())
    top = set(sorted(fro, key=lambda n: -fro[n])[:2])
    assert {n for n, qt in qm.tensors.items() if qt.lqer is not None} == top  # always applied, by ||E||_F


def test_dequant_embed_dtype_rounds_the_embedding_through_bf16():
    state, roles, hessians = tiny_model()
    qm = quantize_state(state, roles, hessians, QuantizeConfig(lqer_mode="off", dequant_embed_dtype="bfloat16"))
    deq = dequantize_state(qm)
    emb = deq["tok_emb.weight"]
    assert emb.dtype == torch.float32 and torch.equal(emb, emb.bfloat16().float())
    head = deq["lm_head.weight"]  # role head: not rounded
    assert not torch.equal(head, head.bfloat16().float())
    plain = dequantize_state(dataclasses.replace(qm, quantize_config={}))  # an artifact without the key
    assert not torch.equal(plain["tok_emb.weight"], emb)


def test_a_hessian_that_is_not_positive_definite_names_its_matrix_and_the_damping_tried() -> None:
    """Every damping attempt fails: the error names the matrix and the largest extra damping really tried."""
    cols = 8
    H = torch.ones(cols, cols) - 0.99 * torch.eye(cols)  # diagonal 0.01 under off-diagonal ones: indefinite
    state = {"blocks.0.attn.q.weight": torch.randn(4, cols)}
    with pytest.raises(QuantizeError) as err:
        quantize_state(state, {"blocks.0.attn.q.weight": "attn"}, {"blocks.0.attn.q.weight": H},
                       QuantizeConfig(lqer_mode="off"))
    # GPTQ's own damping makes the diagonal 0.0101; the extra attempts: 0, then 0.01 x 0.0101 growing tenfold up
    # to 0.101, the last one tried (the message used to give the next one, 1.01, never tried)
    assert str(err.value).startswith("blocks.0.attn.q.weight: GPTQ: Hessian [8, 8] is not positive definite even "
                                     "with extra damping 0.101 ")
