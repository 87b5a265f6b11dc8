"""pgolf's quantization against the record's own script (PR #1855 ``train_gpt.py``) as an oracle, CPU float32.

With config.yaml's quantize and hessians sections pgolf computes what the record computes, bit for bit: SDClip
scales and GPTQ codes (also on "knife-edge" matrices that expose one-ulp differences of the arithmetic), the
attention-gate codes, LQER factors (the record's codebook and its per-row fallback), the route of every tensor,
a whole record-shaped state, its dequantization, the Hessians and the calibration sampler. Each test fails when
one of the differences pgolf had is put back (docs: the quantize section of the README).

Skipped when the record script is absent (``PGOLF_RECORD_SCRIPT``). Shapes are as small as still meaningful.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import oracle_quant as oq
import record_oracle
from pgolf.config import HessianConfig, ModelConfig, QuantizeConfig
from pgolf.data.shards import write_shard
from pgolf.model.gpt import build_meta
from pgolf.quantize.gptq import gptq_quantize_weight, sdclip_scales
from pgolf.quantize.hessians import collect_hessians, record_calibration_rows, row_batch
from pgolf.quantize.lqer import lqer_correction
from pgolf.quantize.weights import _route, dequantize_state, quantize_state


@pytest.fixture(scope="module")
def rec():
    return record_oracle.load_or_skip()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """Both sides in one process with the same thread count (BLAS/LAPACK results may depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qcfg() -> QuantizeConfig:
    return QuantizeConfig(**oq.record_quantize_section())


def _gptq(W, H, bits, clip, block=128, cfg: QuantizeConfig | None = None):
    """pgolf's GPTQ with config.yaml's options."""
    cfg = cfg or QuantizeConfig(**oq.record_quantize_section())
    return gptq_quantize_weight(W, H, bits, clip, block_size=block, damp=cfg.gptq_damp,
                                std_correction=1 if cfg.sdclip_std == "unbiased" else 0,
                                dead_columns=cfg.gptq_dead_columns)


def _differ(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum())


# ------------------------------------------------------------------------------------------ T1-T3: GPTQ


@pytest.mark.parametrize("rows,cols,bits,clip,bf16", [(64, 512, 6, 13.0, False), (32, 1024, 6, 11.5, False),
                                                     (64, 512, 7, 14.0, True)])
def test_sdclip_scales_equal_record(rec, qcfg, rows, cols, bits, clip, bf16):
    """T1: SDClip scales (the record's come out of its GPTQ): the unbiased row std, fp16."""
    W, H = oq.make_problem(rows, cols, seed=rows + cols)
    if bf16:  # the record's tok_emb is bf16 when it is quantized
        W = W.bfloat16()
    _, s_rec = oq.record_gptq(rec, W, H, bits, clip)
    s = sdclip_scales(W, bits, clip, correction=1 if qcfg.sdclip_std == "unbiased" else 0)
    assert torch.equal(s, s_rec), f"{_differ(s, s_rec)}/{s.numel()} scales differ"


@pytest.mark.parametrize("rows,cols,bits,clip,block", [(128, 256, 6, 13.0, 128), (256, 256, 6, 11.5, 64),
                                                       (384, 256, 7, 14.0, 128)])
def test_gptq_equal_record(rec, rows, cols, bits, clip, block):
    """T2: GPTQ codes and scales on generic inputs."""
    W, H = oq.make_problem(rows, cols, seed=7 * rows + cols)
    q_rec, s_rec = oq.record_gptq(rec, W, H, bits, clip, block)
    q, s = _gptq(W, H, bits, clip, block)
    assert torch.equal(s, s_rec) and torch.equal(q, q_rec), f"{_differ(q, q_rec)}/{q.numel()} codes differ"


def _knife_edge_hessians() -> dict[str, torch.Tensor]:
    _, H = oq.make_problem(48, 128, seed=1, heavy=False)
    g = torch.Generator().manual_seed(7)
    X = torch.randn(512, 64, generator=g)
    tied = torch.cat([X, X], 1).T @ torch.cat([X, X], 1)  # features i and i + 64 equal: tied diagonal
    asym = H.clone()  # one ulp above in 30 % of the upper triangle (a CUDA X^T X need not be symmetric)
    up = torch.triu(torch.rand(128, 128, generator=g) < 0.3, 1)
    asym[up] = torch.nextafter(asym[up], torch.full_like(asym[up], math.inf))
    dead = H.clone()  # three input features that never fire
    dead[[3, 50, 90], :] = 0
    dead[:, [3, 50, 90]] = 0
    return {"generic": H, "tied": tied, "asym": asym, "dead": dead}


@pytest.fixture(scope="module")
def knife_edges(rec):
    """{case: (W [96, 128], H, record codes)}: int6, clip 13, block 32 (4 lazy-update blocks)."""
    W, _ = oq.make_problem(48, 128, seed=1, heavy=False)
    out = {}
    for case, H in _knife_edge_hessians().items():
        Wk = oq.knife_edge(rec, W, H, 6, 13.0, 32)
        out[case] = (Wk, H, oq.record_gptq(rec, Wk, H, 6, 13.0, 32)[0])
    return out


@pytest.mark.parametrize("case", ["generic", "tied", "asym", "dead"])
def test_gptq_equal_record_knife_edge(knife_edges, case):
    """T3: one column of every row sits within one float32 ulp of a rounding boundary of the record's GPTQ, so
    any difference of the arithmetic upstream (damping, sort ties, symmetrization, dead columns, H scale) flips
    about half of its codes."""
    Wk, H, q_rec = knife_edges[case]
    q, _ = _gptq(Wk, H, 6, 13.0, 32)
    assert torch.equal(q, q_rec), f"{_differ(q, q_rec)}/{q.numel()} codes differ"


# ----------------------------------------------------------------------------------- T4: the attention gate


def test_gate_int8_equal_record(rec, qcfg):
    """T4: the attention gate [8, 12] -> int8 per row, through pgolf's route."""
    gate = torch.randn(8, 12, generator=torch.Generator().manual_seed(3)) * 0.7
    q_rec, s_rec = rec._quantize_gate_int8_row(gate)
    qt = quantize_state({"g": gate}, {"g": "attn_gate"}, {}, qcfg).tensors["g"]
    assert qt.method == "rtn" and torch.equal(qt.scale, s_rec) and torch.equal(qt.q, q_rec)


# ------------------------------------------------------------------------------------------- T5-T6: LQER


def _record_lqer(rec, name, rows, cols, seed):
    W, H = oq.make_problem(rows, cols, seed=seed)
    h = oq.record_quant_hparams(rec, lqer_top_k=1)
    result, meta = oq.record_mixed(rec, {name: W}, {name: H}, h)
    E = W.float() - result[name + ".q"].float() * result[name + ".scale"].float()[:, None]
    return E, result, meta[name]


def test_lqer_equal_record(rec, qcfg):
    """T5: the record's LQER factors (asym codebook) for four matrices, from the record's own GPTQ error."""
    cases = [("blocks.0.mlp.fc.weight", 512, 192), ("blocks.0.attn.c_q.weight", 320, 256), ("tok_emb.weight", 640, 128),
             ("blocks.0.mlp.proj.weight", 128, 768)]
    bad = []
    for i, (name, rows, cols) in enumerate(cases):
        E, result, info = _record_lqer(rec, name, rows, cols, seed=100 + i)
        assert info.endswith("+lqer_asym"), info
        f = lqer_correction(E, qcfg.lqer_rank, qcfg.lqer_mode, qcfg.lqer_group_size)
        ours = oq.unpack_lqer(f)
        theirs = [result[name + k] for k in (".lqA_a", ".lqAs_a", ".lqB_a", ".lqBs_a")]
        n = sum(_differ(a, b) if a.shape == b.shape else a.numel() for a, b in zip(ours, theirs))
        if f.mode != "asym" or n:
            bad.append(f"{name}: layout {f.mode}, {n} factor entries differ")
    assert not bad, "; ".join(bad)


def test_lqer_fallback_equal_record(rec, qcfg):
    """T6: rank * cols not a multiple of the group (4 * 100 % 64): the record's per-row int4 factors, rowsym."""
    name = "blocks.0.mlp.fc.weight"
    E, result, info = _record_lqer(rec, name, 660, 100, seed=5)
    assert info.endswith("+lqer") and not info.endswith("_asym"), info
    f = lqer_correction(E, qcfg.lqer_rank, qcfg.lqer_mode, qcfg.lqer_group_size)
    assert f.mode == "rowsym"
    for ours, key in zip(oq.unpack_lqer(f), (".lqA", ".lqAs", ".lqB", ".lqBs")):
        assert ours.shape == result[name + key].shape and torch.equal(ours, result[name + key]), key


# ------------------------------------------------------------------------------------------- T7: routing


def test_route_equal_record(rec, qcfg):
    """T7: every tensor of the record's model routed alike (method, bits, clip), the name map a bijection with
    equal shapes; and the small-model cases where pgolf used to differ (small matrices, gates outside 32..8192)."""
    h = oq.record_quant_hparams(rec)
    state = oq.record_meta_state(rec, h)
    roles = oq.pgolf_roles()
    names = {oq.record_to_pgolf_name(n): n for n in state}
    assert set(names) == set(roles) and len(names) == len(state) == 128
    assert all(oq.pgolf_role_of(p) == r for p, r in roles.items())  # what benchmarks/record_bytes.py uses
    shapes = {n: tuple(t.shape) for n, t in build_meta(ModelConfig()).named_parameters()}
    assert all(tuple(state[r].shape) == shapes[p] for p, r in names.items())
    routes = oq.record_routes(rec, state, h)
    diffs = [f"{p}: pgolf {_route(p, roles[p], state[r].numel(), qcfg)} record {routes[r]}"
             for p, r in names.items() if _route(p, roles[p], state[r].numel(), qcfg) != routes[r]]
    assert not diffs, "; ".join(diffs[:4])
    small = {"blocks.0.attn.c_q.weight": (64, 64), "blocks.0.mlp.fc.weight": (256, 256),
             "blocks.0.attn.attn_gate_w": (2, 12), "blocks.1.attn.attn_gate_w": (8, 2048)}
    tensors = {n: torch.randn(shape) for n, shape in small.items()}
    routes = oq.record_routes(rec, tensors, h)
    for name, t in tensors.items():
        pname = oq.record_to_pgolf_name(name)
        assert _route(pname, roles[pname], t.numel(), qcfg) == routes[name] == ("fp16", 16, None), name


# ------------------------------------------------------------------------------ T8-T9: a whole state, back


@pytest.fixture(scope="module")
def small_quantized(rec, qcfg):
    """The d-384 2-layer record-shaped state quantized by both (the record's and pgolf's functions)."""
    h, state, hessians = oq.small_record_state(rec)
    result, meta = oq.record_mixed(rec, state, hessians, h)
    roles = oq.pgolf_roles(**oq.SMALL_PGOLF)
    pstate = {oq.record_to_pgolf_name(n): t for n, t in state.items()}
    phess = {oq.record_to_pgolf_name(n): H for n, H in hessians.items()}
    qm = quantize_state(pstate, roles, phess, qcfg)
    return state, result, meta, qm


def test_quantize_state_equal_record(small_quantized):
    """T8: every code, scale, passthrough value, gate code and LQER factor; the same 3 LQER tensors."""
    _, result, meta, qm = small_quantized
    bad = []
    for rname, info in meta.items():
        qt = qm.tensors[oq.record_to_pgolf_name(rname)]
        if info.startswith("passthrough"):
            pairs = [(qt.data, result[rname])]
        elif info == "gate_int8_row":
            pairs = [(qt.q, result[rname + ".gq"]), (qt.scale, result[rname + ".gs"])]
        else:
            pairs = [(qt.q, result[rname + ".q"]), (qt.scale, result[rname + ".scale"])]
            if ("+lqer" in info) != (qt.lqer is not None):
                bad.append(f"{rname}: LQER record {'+lqer' in info}, pgolf {qt.lqer is not None}")
            elif qt.lqer is not None:
                pairs += list(zip(oq.unpack_lqer(qt.lqer), (result[rname + k] for k in (".lqA_a", ".lqAs_a", ".lqB_a", ".lqBs_a"))))
        bad += [rname for a, b in pairs if a is None or a.shape != b.shape or not torch.equal(a, b)]
    assert sum("+lqer" in i for i in meta.values()) == 3
    assert not bad, "; ".join(sorted(set(bad))[:6])


def test_dequantize_equal_record(rec, small_quantized):
    """T9: dequantized values equal the record's evaluation weights (``dequantize_mixed`` into its bf16 model +
    ``restore_fp32_params`` template: tok_emb bf16, everything else float32)."""
    state, result, meta, qm = small_quantized
    template = {n: torch.zeros(t.shape, dtype=torch.bfloat16 if n == "tok_emb.weight" else torch.float32)
                for n, t in state.items()}
    theirs = rec.dequantize_mixed(result, meta, template)
    ours = dequantize_state(qm)
    bad = [n for n, t in theirs.items() if not torch.equal(ours[oq.record_to_pgolf_name(n)], t.float())]
    assert not bad, bad[:6]


# ------------------------------------------------------------------------------------------ T10-T12: Hessians


class _Rows:
    """Stands in for the record's calibration loader: ``next_batch`` -> (x [B, T], y)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self, global_tokens, grad_accum_steps):
        x = self.batches.pop(0)
        return x, x


TINY_RECORD = dict(model_dim=64, num_heads=4, num_kv_heads=2, num_layers=4, vocab_size=64, mlp_mult=4.0,
                   rope_dims=8, num_loops=2, loop_start=1, loop_end=2)


def _twin_models(rec, smear: float, xsa: int, lanes: int):
    """The record's GPT and pgolf's with the same random weights (every zero-initialized path made active),
    float32, looping on (layers 1-2 three times)."""
    h = oq.record_quant_hparams(rec, **TINY_RECORD, xsa_last_n=xsa, parallel_start_layer=lanes)
    torch.manual_seed(0)
    rm = rec.GPT(h).float()
    g = torch.Generator().manual_seed(1)
    d = TINY_RECORD["model_dim"]
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if name == "smear_lambda":
                p.fill_(smear)
            elif p.ndim >= 2 and name != "resid_mix":
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        for block in rm.blocks:
            block.resid_mix.copy_(torch.stack([torch.ones(d), torch.zeros(d)]) + 0.2 * torch.randn(2, d, generator=g))
        rm.skip_gates.copy_(torch.randn(rm.skip_gates.shape, generator=g))
        for module in rm.modules():  # the record's run casts its model to bf16, inv_freq included (never restored)
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
                module.inv_freq.copy_(module.inv_freq.bfloat16().float())
    rm.eval()
    rm.looping_active = True  # as training leaves it before serialize
    cfg = ModelConfig(vocab_size=64, num_layers=4, model_dim=d, num_heads=4, num_kv_heads=2, mlp_mult=4.0,
                      rope_dims=8, xsa_last_n=xsa, loop_start=1, loop_end=2, loop_count=3,
                      parallel_residual_start=lanes if lanes > 0 else -1)
    from pgolf.model.gpt import GPT

    pm = GPT(cfg)
    flat = rec._unbank_state_dict(rm.state_dict(), h.num_layers)
    pm.load_state_dict({oq.record_to_pgolf_name(n): t for n, t in flat.items()
                        if lanes > 0 or not n.startswith("parallel_")}, strict=True)
    pm.use_fused_kernels = False
    return h, rm, pm


def _both_hessians(rec, h, rm, pm, batches):
    """(record H by record name, pgolf H by pgolf name) from the same token rows, config.yaml's hessians options."""
    Hr = rec.collect_hessians(rm, _Rows(batches), h, torch.device("cpu"), n_calibration_batches=len(batches))
    cfg = HessianConfig(**oq.record_hessians_section())
    packed = [row_batch(x, cfg.attention) for x in batches]
    Hp = collect_hessians(pm, packed, "cpu", normalize=cfg.normalize)
    return Hr, Hp


def _one_token_rows(n_batches: int = 4, rows: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(2, 64, (rows, 1), generator=g) for _ in range(n_batches)]


def test_hessians_equal_record(rec):
    """T10: one-token rows (attention reads only its own value, RoPE is the identity, SmearGate has no
    predecessor), XSA and lanes off, looping on: the same 25 Hessians, bit for bit, divided by the batch count."""
    h, rm, pm = _twin_models(rec, smear=0.0, xsa=0, lanes=0)
    Hr, Hp = _both_hessians(rec, h, rm, pm, _one_token_rows())
    assert {oq.record_to_pgolf_name(n) for n in Hr} == set(Hp) and len(Hp) == 25
    bad = [n for n, H in Hr.items() if not torch.equal(Hp[oq.record_to_pgolf_name(n)], H)]
    assert not bad, bad[:4]


def test_hessians_smear_row_start(rec):
    """T11: as T10 with SmearGate lambda 0.3: every calibration row is its own sequence (its first token has no
    predecessor), so layer 0's attention input Hessian still equals the record's."""
    h, rm, pm = _twin_models(rec, smear=0.3, xsa=0, lanes=0)
    Hr, Hp = _both_hessians(rec, h, rm, pm, _one_token_rows())
    for n in ("blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight", "tok_emb.weight"):
        assert torch.equal(Hp[oq.record_to_pgolf_name(n)], Hr[n]), n


def test_hessians_equal_record_rows(rec):
    """T12: rows of 32 tokens with a document starting mid-row, XSA, lanes, smear and looping on: attention causal
    over the whole row (``attention: rows``), positions from the row start: the Hessians equal the record's, bit
    for bit."""
    h, rm, pm = _twin_models(rec, smear=0.3, xsa=4, lanes=3)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(2, 64, (6, 32), generator=g) for _ in range(2)]
    for x in batches:
        x[:, 11] = record_oracle.BOS_ID  # a document starts mid-row
    Hr, Hp = _both_hessians(rec, h, rm, pm, batches)
    bad = [n for n, H in Hr.items() if not torch.equal(Hp[oq.record_to_pgolf_name(n)], H)]
    assert not bad, bad[:4]


# ------------------------------------------------------------------------------------ the calibration sampler


@pytest.mark.parametrize("rank", [0, 1])
def test_record_sampler_equal_record(rec, tmp_path, rank):
    """``sampler: record`` draws the rows of the record's ShuffledSequenceLoader (rank ``rank`` of 2), through a
    reshuffle of every shard (more rows asked than the rank's shards hold)."""
    g = np.random.default_rng(4)
    for i, n in enumerate([500, 700, 300, 450]):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", g.integers(0, 8192, n).astype(np.uint16))
    cfg = HessianConfig(batches=4, batch_rows=6, seq_len=40, sampler="record", sampler_world_size=2,
                        sampler_rank=rank)
    h = record_oracle.record_hparams(rec, train_files=str(tmp_path / "fineweb_train_*.bin"), world_size=2,
                                     rank=rank, train_seq_len=40)
    loader = rec.ShuffledSequenceLoader(h, torch.device("cpu"))
    theirs = [loader.next_batch(2 * 6 * 40, 1)[0] for _ in range(cfg.batches)]
    ours, _ = record_calibration_rows(sorted(tmp_path.glob("fineweb_train_*.bin")), cfg)
    for b in range(cfg.batches):
        assert np.array_equal(ours[b].astype(np.int64), theirs[b].numpy()), b
