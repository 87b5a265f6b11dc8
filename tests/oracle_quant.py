"""Helpers of the quantization oracle tests (tests/test_record_quant_oracle.py) and benchmarks/record_bytes.py.

The record script is imported only through :mod:`record_oracle`; this module calls its functions and converts
between its names and results and pgolf's. No record code is copied.

- :data:`RECORD_QUANT_HPARAMS`: the record run's quantization environment (train_seed42.log, side_by_side.sh),
  set on ``Hyperparameters`` instances (the class read the environment at import, which another test may have
  done first).
- :func:`record_to_pgolf_name`: unbanked record names -> pgolf parameter names.
- :func:`make_problem`, :func:`knife_edge`: GPTQ inputs; a knife-edge matrix puts one column of every row within one
  float32 ulp of a rounding boundary of the record's GPTQ, so any arithmetic difference upstream flips codes.
- :func:`record_mixed`, :func:`record_routes`, :func:`record_meta_state`, :func:`small_record_state`: the record's
  ``gptq_mixed_quantize`` and its routes, on record-shaped states.
- :func:`record_to_pgolf_qm`: the record's quantized result as a pgolf ``QuantizedModel`` (same codes, scales,
  passthroughs, gate and LQER factors), so pgolf's decoder and packer see exactly the record's quantized weights.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path
from typing import Optional

import torch
import yaml

import record_oracle

REPO_ROOT = Path(__file__).resolve().parents[1]

RECORD_QUANT_HPARAMS = dict(
    matrix_bits=6, embed_bits=7, matrix_clip_sigmas=12.85, attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5,
    embed_clip_sigmas=14.0, gated_attn_quant_gate=True, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5,
    gate_window=12, smear_gate_enabled=True, lqer_enabled=True, lqer_asym_enabled=True, lqer_rank=4,
    lqer_factor_bits=4, lqer_asym_group=64, lqer_top_k=3, gptq_calibration_batches=16,
)

# record-sized 2-layer model small enough for CPU whose every matrix still has > 65,536 elements (the record
# GPTQs it): d 384, 6 heads / 3 KV heads (head dim 64), MLP 384, vocab 256
SMALL_RECORD = dict(model_dim=384, num_heads=6, num_kv_heads=3, mlp_mult=1.0, num_layers=2, vocab_size=256,
                    loop_start=0, loop_end=1, num_loops=1, parallel_start_layer=1, xsa_last_n=2)
SMALL_PGOLF = dict(model_dim=384, num_heads=6, num_kv_heads=3, mlp_mult=1.0, num_layers=2, vocab_size=256,
                   loop_start=0, loop_end=1, loop_count=2, parallel_residual_start=1, xsa_last_n=2)


def record_quant_hparams(rec, **overrides):
    return record_oracle.record_hparams(rec, **{**RECORD_QUANT_HPARAMS, **overrides})


def record_quantize_section() -> dict:
    """config.yaml's quantize section (the record recipe)."""
    return yaml.safe_load((REPO_ROOT / "config.yaml").read_text(encoding="utf-8"))["quantize"]


def record_hessians_section() -> dict:
    """config.yaml's hessians section (the record recipe)."""
    return yaml.safe_load((REPO_ROOT / "config.yaml").read_text(encoding="utf-8"))["hessians"]


# ----------------------------------------------------------------------------------------------------- names

_BLOCK_NAMES = {
    "attn.c_q.weight": "attn.q.weight", "attn.c_k.weight": "attn.k.weight", "attn.c_v.weight": "attn.v.weight",
    "attn.proj.weight": "attn.o.weight", "mlp.fc.weight": "mlp.up.weight", "mlp.proj.weight": "mlp.down.weight",
    "attn.attn_gate_w": "attn.gate.weight", "attn.q_gain": "attn.q_gain", "attn_scale": "attn_scale",
    "mlp_scale": "mlp_scale", "resid_mix": "resid_mix",
}
_TOP_NAMES = {
    "tok_emb.weight": "tok_emb.weight", "smear_gate.weight": "smear.gate.weight", "smear_lambda": "smear.lam",
    "skip_weights": "skip_weights", "skip_gates": "skip_gates", "parallel_post_lambdas": "lane_post_lambdas",
    "parallel_resid_lambdas": "lane_resid_lambdas",
}


def record_to_pgolf_name(name: str) -> str:
    """Unbanked record name -> pgolf parameter name (KeyError for a name with no counterpart)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"blocks.{parts[1]}.{_BLOCK_NAMES['.'.join(parts[2:])]}"
    return _TOP_NAMES[name]


def pgolf_role_of(pgolf_name: str) -> str:
    """pgolf's role of a parameter of a record-architecture model, from its name alone (for record files whose
    model config is not at hand; equal to ``GPT.param_roles()`` for the record, tests T7)."""
    last = pgolf_name.split(".", 2)[-1] if pgolf_name.startswith("blocks.") else pgolf_name
    if pgolf_name == "tok_emb.weight":
        return "embedding"
    if last in ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight"):
        return "attn"
    if last in ("mlp.up.weight", "mlp.down.weight"):
        return "mlp"
    if last == "attn.gate.weight":
        return "attn_gate"
    if last in ("smear.gate.weight", "smear.lam", "skip_gates"):
        return "gate"
    return "scalar"


def pgolf_roles(**model_config) -> dict[str, str]:
    from pgolf.config import ModelConfig
    from pgolf.model.gpt import build_meta

    return build_meta(ModelConfig(**model_config)).param_roles()


# ----------------------------------------------------------------------------------------------- GPTQ inputs


def make_problem(rows: int, cols: int, seed: int, heavy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, cols] (heavy-tailed, per-row and per-column scales) and H = X^T X / 16 [cols, cols] from
    correlated inputs with log-normal feature scales, accumulated with addmm_ (as both implementations do)."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.exp(torch.randn(cols, generator=g) * 0.7)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = (torch.randn(4 * cols, cols, generator=g) @ mix) * feat
    H = torch.zeros(cols, cols)
    H.addmm_(X.T, X)
    H /= 16
    Z = torch.randn(rows, cols, generator=g)
    if heavy:  # Student-t with 5 degrees of freedom: outliers make the clip matter
        Z = Z / torch.sqrt(sum(torch.randn(rows, cols, generator=g) ** 2 for _ in range(5)) / 5)
    row_scale = torch.exp(torch.randn(rows, 1, generator=g) * 0.3)
    col_scale = torch.exp(torch.randn(1, cols, generator=g) * 0.3)
    return (Z * 0.02 * row_scale * col_scale).float(), H


def record_gptq(rec, W: torch.Tensor, H: torch.Tensor, bits: int, clip: float, block: int = 128):
    """The record's ``gptq_quantize_weight``: (codes int8, scales fp16)."""
    return rec.gptq_quantize_weight(W.clone(), H.clone(), clip_sigmas=clip, clip_range=2 ** (bits - 1) - 1,
                                    block_size=block)


def knife_edge(rec, W: torch.Tensor, H: torch.Tensor, bits: int, clip: float, block: int) -> torch.Tensor:
    """``[2 * rows, cols]``: W twice over; in the column the record processes LAST (smallest diag H), row i of the
    first copy holds the largest float32 value whose record code is still the lower one, row i of the second copy
    the next float32 above it. Found by bisection with the record's own GPTQ (rows are independent)."""
    rows = W.shape[0]
    W2 = torch.cat([W, W])
    col = int(torch.argmin(torch.diag(H)))
    step = 3 * (clip * W2.float().std(dim=1) / (2 ** (bits - 1) - 1))

    def codes(values: torch.Tensor) -> torch.Tensor:
        Wt = W2.clone()
        Wt[:, col] = values
        return record_gptq(rec, Wt, H, bits, clip, block)[0][:, col]

    lo, hi = W2[:, col] - step, W2[:, col] + step
    low_code = codes(lo)
    for _ in range(80):
        mid = ((lo.double() + hi.double()) / 2).float()
        open_ = (mid != lo) & (mid != hi)
        if not bool(open_.any()):
            break
        same = codes(mid) == low_code
        lo = torch.where(same & open_, mid, lo)
        hi = torch.where(~same & open_, mid, hi)
    out = W2.clone()
    out[:rows, col] = lo[:rows]
    out[rows:, col] = hi[rows:]
    return out


# --------------------------------------------------------------------------------------- whole-state paths


def record_mixed(rec, state: dict, hessians: dict, h) -> tuple[dict, dict]:
    """The record's ``gptq_mixed_quantize`` (its log lines swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return rec.gptq_mixed_quantize(state, hessians, h)


def record_meta_state(rec, h) -> dict[str, torch.Tensor]:
    """The unbanked record state for ``h`` (uninitialized tensors of the right shapes and dtypes)."""
    with torch.device("meta"):
        model = rec.GPT(h)
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    return rec._unbank_state_dict(state, h.num_layers)


@contextlib.contextmanager
def record_gptq_replaced(rec, fn):
    """Replace the record module's ``gptq_quantize_weight`` (looked up at call time) inside the block."""
    saved = rec.gptq_quantize_weight
    rec.gptq_quantize_weight = fn
    try:
        yield
    finally:
        rec.gptq_quantize_weight = saved


def record_routes(rec, state: dict, h) -> dict[str, tuple[str, int, Optional[float]]]:
    """``{name: (method, bits, clip)}`` as the record routes each tensor (GPTQ stubbed, LQER off)."""
    calls = []

    def stub(w, H, clip_sigmas=3.0, clip_range=63, block_size=128):
        calls.append((clip_sigmas, clip_range))
        return torch.zeros(w.shape, dtype=torch.int8), torch.ones(w.shape[0], dtype=torch.float16)

    h = copy.copy(h)
    h.lqer_enabled = False
    with record_gptq_replaced(rec, stub):
        _, meta = record_mixed(rec, state, {n: None for n in state}, h)
    out = {}
    for name, info in meta.items():  # meta is filled in state order, as the GPTQ calls are made
        if info == "gate_int8_row":
            out[name] = ("rtn", 8, None)
        elif info.startswith("passthrough"):
            out[name] = ("fp16", 16, None)
        else:
            clip, clip_range = calls.pop(0)
            out[name] = ("gptq", int(math.log2(clip_range + 1)) + 1, clip)
    return out


def small_record_state(rec, seed: int = 0):
    """(record hparams, record-named state, Hessians) of the d-384 2-layer record-shaped model: random matrices
    with H = X^T X (q/k/v share one, as in both implementations), small tensors around 1 or 0, tok_emb in bf16
    (the record quantizes its bf16 embedding)."""
    h = record_quant_hparams(rec, **SMALL_RECORD)
    g = torch.Generator().manual_seed(seed)
    state, hessians, shared = {}, {}, {}
    for i, (name, t) in enumerate(record_meta_state(rec, h).items()):
        if t.ndim == 2 and t.numel() > 65_536:
            W, H = make_problem(t.shape[0], t.shape[1], seed=seed * 1000 + i)
            state[name] = W
            key = name.replace("c_k", "c_q").replace("c_v", "c_q")
            shared.setdefault(key, H)
            hessians[name] = shared[key]
        else:
            state[name] = torch.randn(t.shape, generator=g) * 0.1 + (1.0 if t.ndim == 1 else 0.0)
    state["tok_emb.weight"] = state["tok_emb.weight"].bfloat16()
    return h, state, hessians


def record_to_pgolf_qm(result: dict, meta: dict, roles: dict[str, str], quantize_config: dict):
    """The record's ``(quant_result, quant_meta)`` as a pgolf ``QuantizedModel`` with the same codes, scales,
    passthrough values, gate codes and LQER factors (layouts ``asym`` and ``rowsym``)."""
    from pgolf.quantize.lqer import LqerFactors, pack_int2, pack_int4
    from pgolf.quantize.weights import QuantizedModel, QuantizedTensor

    group = int(quantize_config.get("lqer_group_size", 64))
    tensors = {}
    for rname, info in meta.items():
        name = record_to_pgolf_name(rname)
        role = roles[name]
        if info.startswith("passthrough"):
            data = result[rname]
            tensors[name] = QuantizedTensor(role, "fp16", tuple(data.shape), 16, data=data.to(torch.float16))
            continue
        if info == "gate_int8_row":
            q = result[rname + ".gq"]
            tensors[name] = QuantizedTensor(role, "rtn", tuple(q.shape), 8, q=q, scale=result[rname + ".gs"])
            continue
        bits = int(info.split("(int")[1].split(")")[0])
        q, scale = result[rname + ".q"], result[rname + ".scale"]
        rows, cols = q.shape
        lqer = None
        if "+lqer_asym" in info:
            qA, sA, qB, sB = (result[rname + k] for k in (".lqA_a", ".lqAs_a", ".lqB_a", ".lqBs_a"))
            if cols % group:
                raise ValueError(f"{rname}: the record's B groups straddle rows (cols {cols} % group {group})")
            lqer = LqerFactors("asym", (rows, cols), qA.shape[1], group, pack_int2((qA.to(torch.int16) + 2).reshape(-1)),
                               sA.reshape(1), pack_int4((qB.to(torch.int16) + 8).reshape(-1)),
                               sB.reshape(qB.shape[0], cols // group))
        elif "+lqer" in info:
            qA, sA, qB, sB = (result[rname + k] for k in (".lqA", ".lqAs", ".lqB", ".lqBs"))
            lqer = LqerFactors("rowsym", (rows, cols), qA.shape[1], group, pack_int4((qA.to(torch.int16) + 8).reshape(-1)),
                               sA, pack_int4((qB.to(torch.int16) + 8).reshape(-1)), sB)
        tensors[name] = QuantizedTensor(role, "gptq", (rows, cols), bits, None, q=q, scale=scale, lqer=lqer)
    return QuantizedModel(tensors, dict(quantize_config), [])


def unpack_lqer(factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qA int8, sA, qB int8, sB) of pgolf LQER factors in the record's shapes (asym: sB flattened, sA 0-dim)."""
    from pgolf.quantize.lqer import unpack_int2, unpack_int4

    rows, cols = factors.shape
    r = factors.rank
    qB = (unpack_int4(factors.b_codes, r * cols).to(torch.int16) - 8).to(torch.int8).view(r, cols)
    if factors.mode == "asym":
        qA = (unpack_int2(factors.a_codes, rows * r).to(torch.int16) - 2).to(torch.int8).view(rows, r)
        return qA, factors.a_scales.reshape(()), qB, factors.b_scales.reshape(-1)
    qA = (unpack_int4(factors.a_codes, rows * r).to(torch.int16) - 8).to(torch.int8).view(rows, r)
    return qA, factors.a_scales, qB, factors.b_scales
