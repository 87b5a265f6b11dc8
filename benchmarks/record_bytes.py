"""Artifact bytes of the SAME quantized weights: the record's serialization vs pgolf's pack (issue 15, B1).

    # the record's own quantized model (its serialize() output; COMPRESSOR=brotli or pergroup)
    python benchmarks/record_bytes.py --ptz final_model.int6.ptz [--num-layers 11] [--json out.json]
    # the record's trained weights, quantized here by the record's own gptq_mixed_quantize
    python benchmarks/record_bytes.py --final-model final_model.pt [--hessians H.pt] [--json out.json]
    # synthetic (untrained) weights, for a quick look: small = d 384, 2 layers (real GPTQ); record = 36M (RTN)
    python benchmarks/record_bytes.py --synthetic small [--structure iid|structured]

Needs the record script (``PGOLF_RECORD_SCRIPT``, imported through tests/record_oracle.py). Steps:

1. The record's quantized weights ``(quant_result, quant_meta)``: read from ``--ptz`` (a brotli'd
   ``torch.save({"w", "m"})``, or a ``PGRP`` per-group blob, which needs ``lrzip``), or made by the record's
   ``gptq_mixed_quantize`` from ``--final-model`` (with ``--hessians``, a torch file of Hessians by record or pgolf
   name, e.g. pgolf's hessians.pt; without, round-to-nearest at the record's SDClip scales stands in for GPTQ: both
   sides still see the same codes) or from synthetic weights.
2. The record's bytes: ``_serialize_pergroup`` (per-group lrzip ZPAQ + brotli rest; needs the ``lrzip`` binary;
   slow: ~100 s at record size on the record's host, ~15 min on a 2-core box) and the brotli path
   (``torch.save`` + brotli q11).
3. pgolf's bytes: the same codes, scales, passthrough values, gate codes and LQER factors as a pgolf
   ``QuantizedModel`` (tests/oracle_quant.record_to_pgolf_qm), packed with config.yaml's pack section and a header
   as the pack stage writes it (model config, config.yaml's quantize section, six sha256 input hashes); unpacked
   again and checked bit for bit, and its dequantization checked against the record's ``dequantize_mixed``.

Prints one line per measurement and, with ``--json``, writes them. Model bytes only (the counted code is separate).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import oracle_quant as oq  # noqa: E402
import record_oracle  # noqa: E402

from pgolf.artifact.format import pack, unpack  # noqa: E402
from pgolf.config import ModelConfig, PackConfig, QuantizeConfig, to_dict  # noqa: E402
from pgolf.quantize.gptq import rtn_quantize, sdclip_scales  # noqa: E402
from pgolf.quantize.weights import dequantize_state  # noqa: E402


def _log(msg: str) -> None:
    print(msg, flush=True)


def load_ptz(rec, path: Path, num_layers: int) -> tuple[dict, dict]:
    """(quant_result, quant_meta) of a record-written ``final_model.int6.ptz``."""
    blob = path.read_bytes()
    if blob[:4] == b"PGRP":
        if not shutil.which("lrzip"):
            raise SystemExit(f"{path}: a per-group (PGRP) blob needs the lrzip binary to decode")
        tmp = tempfile.mkdtemp(prefix="pgrp_dec_")
        try:
            return rec._deserialize_pergroup(blob, num_layers, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    import brotli

    state = torch.load(io.BytesIO(brotli.decompress(blob)), map_location="cpu", weights_only=True)
    return state["w"], state["m"]


def _rtn_stand_in(w, H, clip_sigmas=3.0, clip_range=63, block_size=128):
    """Round-to-nearest at the record's SDClip scales (pgolf's sdclip_scales equals the record's, oracle T1)."""
    bits = (clip_range + 1).bit_length()
    scale = sdclip_scales(w, bits, clip_sigmas)
    return rtn_quantize(w, scale, bits), scale


def _record_hessians(path: Path, names: list[str]) -> dict:
    """Hessians by record name from a torch file keyed by record or pgolf names (q/k/v may share one)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name in names:
        pname = oq.record_to_pgolf_name(name)
        if name in data:
            out[name] = data[name].float()
        elif pname in data:
            out[name] = data[pname].float()
    return out


def quantize_with_record(rec, state: dict, h, hessians: dict | None) -> tuple[dict, dict, str]:
    if hessians:
        missing = [n for n, t in state.items() if t.ndim == 2 and t.numel() > 65_536 and n not in hessians]
        if missing:
            raise SystemExit(f"--hessians: no Hessian for {missing[:3]}")
        return (*oq.record_mixed(rec, state, hessians, h), "record GPTQ")
    with oq.record_gptq_replaced(rec, _rtn_stand_in):
        return (*oq.record_mixed(rec, state, {n: None for n in state}, h), "RTN at the record's SDClip scales")


def synthetic_state(rec, size: str, structure: str, seed: int = 11):
    """Record-shaped synthetic weights: Student-t (iid) or with log-normal row and column scales (structured)."""
    h = oq.record_quant_hparams(rec, **(oq.SMALL_RECORD if size == "small" else {}))
    g = torch.Generator().manual_seed(seed)
    state, hessians = {}, {}
    for i, (name, t) in enumerate(oq.record_meta_state(rec, h).items()):
        rows_cols = tuple(t.shape)
        if t.ndim == 2 and t.numel() > 65_536:
            Z = torch.randn(rows_cols, generator=g)
            W = Z / torch.sqrt(sum(torch.randn(rows_cols, generator=g) ** 2 for _ in range(5)) / 5) * 0.02
            if structure == "structured":
                W = W * torch.exp(0.5 * torch.randn(rows_cols[0], 1, generator=g))
                W = W * torch.exp(0.5 * torch.randn(1, rows_cols[1], generator=g))
            state[name] = W
            if size == "small":
                hessians[name] = oq.make_problem(4, rows_cols[1], seed=i)[1]
        elif name.endswith("attn_gate_w"):
            state[name] = torch.randn(rows_cols, generator=g) * 0.5
        else:
            state[name] = 1.0 + 0.1 * torch.randn(rows_cols, generator=g)
    state["tok_emb.weight"] = state["tok_emb.weight"].bfloat16()
    return h, state, hessians


def record_bytes(rec, result: dict, meta: dict, num_layers: int, pergroup: bool, roundtrip: bool) -> dict:
    out = {}
    buf = io.BytesIO()
    torch.save({"w": result, "m": meta}, buf)
    import brotli

    t0 = time.perf_counter()
    out["record_brotli_bytes"] = len(brotli.compress(buf.getvalue(), quality=11))
    _log(f"record brotli (torch.save + brotli q11): {out['record_brotli_bytes']:,} bytes, {time.perf_counter() - t0:.0f} s")
    if not pergroup:
        return out
    if not shutil.which("lrzip"):
        _log("record pergroup: skipped (no lrzip binary on PATH)")
        return out
    tmp = tempfile.mkdtemp(prefix="pgrp_")
    try:
        t0 = time.perf_counter()
        blob = rec._serialize_pergroup(result, meta, num_layers, tmp)
        out["record_pergroup_bytes"] = len(blob)
        out["record_pergroup_seconds"] = time.perf_counter() - t0
        exact = None
        if roundtrip:
            back, _ = rec._deserialize_pergroup(blob, num_layers, tmp)
            exact = set(back) == set(result) and all(torch.equal(back[k], result[k]) for k in result)
        out["record_pergroup_roundtrip_exact"] = exact
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"record pergroup (lrzip -z -L 9 per group + brotli rest): {out['record_pergroup_bytes']:,} bytes, "
         f"{out['record_pergroup_seconds']:.0f} s, round trip exact: {out['record_pergroup_roundtrip_exact']}")
    return out


def pgolf_bytes(rec, result: dict, meta: dict, model_config: dict, pack_section: dict, quantize_section: dict) -> dict:
    roles = {oq.record_to_pgolf_name(n): oq.pgolf_role_of(oq.record_to_pgolf_name(n)) for n in meta}
    qcfg = to_dict(QuantizeConfig(**quantize_section))
    qm = oq.record_to_pgolf_qm(result, meta, roles, qcfg)
    # the pack stage's header carries six sha256 input hashes; random ones cost what real ones do
    hashes = {k: hashlib.sha256(k.encode()).hexdigest() for k in ("checkpoint_weights_sha256", "hessians_sha256",
              "quantize_config_sha256", "code_sha256", "pgolf_code_hash", "data_manifest_sha256")}
    out = {}
    variants = {"pgolf_pack_bytes": pack_section, "pgolf_pack_codes_brotli_bytes": {**pack_section, "codes_coder": "compressor"}}
    if shutil.which("lrzip"):
        variants["pgolf_pack_lrzip_bytes"] = {**pack_section, "compressor": "lrzip", "codes_coder": "compressor"}
    for key, section in variants.items():
        cfg = PackConfig(**section)
        t0 = time.perf_counter()
        data = pack(qm, model_config, hashes, cfg, sha256_hex_chars=cfg.sha256_hex_chars)
        seconds = time.perf_counter() - t0
        back, _ = unpack(data)
        exact = all(
            (getattr(back.tensors[n], f) is None) == (getattr(qt, f) is None)
            and (getattr(qt, f) is None or torch.equal(getattr(back.tensors[n], f), getattr(qt, f)))
            for n, qt in qm.tensors.items() for f in ("q", "scale", "data")
        )
        out[key] = len(data)
        _log(f"{key} ({cfg.compressor}, codes_coder {cfg.codes_coder}): {len(data):,} bytes, {seconds:.0f} s, "
             f"round trip exact: {exact}")
    template = {n: torch.zeros(1) for n in meta}  # float32 everywhere: compare the reconstruction itself
    theirs = rec.dequantize_mixed(result, meta, template)
    ours = dequantize_state(qm, torch.float32)
    emb = "tok_emb.weight"
    same = all(torch.equal(ours[oq.record_to_pgolf_name(n)], t) for n, t in theirs.items() if n != emb)
    same_emb = torch.equal(ours[emb], theirs[emb].bfloat16().float())  # pgolf rounds the embedding through bf16
    out["dequantized_equal_record"] = bool(same and same_emb)
    _log(f"pgolf dequantization == record dequantize_mixed (tok_emb through bf16): {out['dequantized_equal_record']}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ptz", type=Path, help="the record's final_model.int6.ptz")
    src.add_argument("--final-model", type=Path, help="the record's final_model.pt (banked state dict)")
    src.add_argument("--synthetic", choices=["small", "record"])
    parser.add_argument("--structure", choices=["iid", "structured"], default="iid")
    parser.add_argument("--hessians", type=Path, help="with --final-model: Hessians by record or pgolf name")
    parser.add_argument("--num-layers", type=int, default=11, help="with a PGRP --ptz: the model's layers")
    parser.add_argument("--no-pergroup", action="store_true", help="skip the record's per-group lrzip (slow)")
    parser.add_argument("--roundtrip", action="store_true", help="also decode the record's per-group blob (slow)")
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml", help="pack and quantize sections")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    rec = record_oracle.load_record()
    recipe = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    report: dict = {"source": None}
    model_config = to_dict(ModelConfig())
    t0 = time.perf_counter()
    if args.ptz:
        result, meta = load_ptz(rec, args.ptz, args.num_layers)
        report.update(source=str(args.ptz), record_file_bytes=args.ptz.stat().st_size, quantizer="the record run's")
        _log(f"{args.ptz}: {report['record_file_bytes']:,} bytes as the record wrote it")
        num_layers = 1 + max(int(n.split(".")[1]) for n in meta if n.startswith("blocks."))
    else:
        if args.final_model:
            sd = torch.load(args.final_model, map_location="cpu", weights_only=True)
            num_layers = sd["qo_bank"].shape[0] // 2
            state = rec._unbank_state_dict(sd, num_layers)
            h = oq.record_quant_hparams(rec, num_layers=num_layers)
            hessians = _record_hessians(args.hessians, list(state)) if args.hessians else None
            report["source"] = str(args.final_model)
        else:
            h, state, hessians = synthetic_state(rec, args.synthetic, args.structure)
            num_layers = h.num_layers
            report["source"] = f"synthetic {args.synthetic} {args.structure}"
            if args.synthetic == "small":
                model_config = to_dict(ModelConfig(**oq.SMALL_PGOLF))
        result, meta, how = quantize_with_record(rec, state, h, hessians)
        report["quantizer"] = how
    report["quantize_seconds"] = time.perf_counter() - t0
    report["gptq_codes"] = sum(int(t.numel()) for k, t in result.items() if k.endswith(".q"))
    report["lqer"] = sorted(n for n, i in meta.items() if "lqer" in i)
    _log(f"source: {report['source']}; quantized by {report['quantizer']} ({report['quantize_seconds']:.0f} s); "
         f"{len(meta)} tensors, {report['gptq_codes']:,} GPTQ codes, LQER on {report['lqer']}")
    report.update(record_bytes(rec, result, meta, num_layers, not args.no_pergroup, args.roundtrip))
    report.update(pgolf_bytes(rec, result, meta, model_config, recipe["pack"], recipe["quantize"]))
    best = min(v for k, v in report.items() if k in ("record_pergroup_bytes", "record_brotli_bytes"))
    report["pgolf_minus_record_best_bytes"] = report["pgolf_pack_bytes"] - best
    _log(f"pgolf pack - record's best: {report['pgolf_minus_record_best_bytes']:+,} bytes")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
