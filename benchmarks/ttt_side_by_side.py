"""The record's phased LoRA-TTT evaluation and pgolf's, side by side on ONE GPU: same weights, same documents.

    python benchmarks/ttt_side_by_side.py --side record --out OUT      # the record script's eval_val_ttt_phased
    python benchmarks/ttt_side_by_side.py --side pgolf --out OUT       # pgolf's record variant (fidelity settings)
    python benchmarks/ttt_side_by_side.py --side compare --out OUT     # the table (and OUT/ttt_side_by_side.json)

(``--side both`` runs the two one after the other in fresh processes, then compares: about 2 x (compile + scoring),
so split it over two device calls when it would not fit one.)

Inputs, identical on both sides (each side is its own process and rebuilds them from the same seeds):
  * weights: ``--artifact A`` (a pgolf artifact, dequantized), else the record-size model of ``config.yaml`` with
    the record's init plus N(0, 0.02) on the zero-initialised matrices (so that nothing is trivially zero);
  * documents: ``--data-dir D`` (the first ``--docs`` validation documents of real shards), else ``--docs``
    documents whose lengths are a stratified sample of the record's rebuilt lengths up to ``--max-doc-len``
    (benchmarks/record_doc_lengths.txt), with random tokens and 1-4 bytes per token (0 at BOS);
  * TTT settings: the record run's (rank 80, alpha 144, chunks of 48, windows of 2048, 64 documents a batch,
    AdamW 1e-4 (0, 0.99) wd 0.5 eps 1e-10, phases at prefix * k / 3 of min(docs, 2500) scored documents, phase SGD
    1e-3 momentum 0.9 clip 1.0, chunks of 32768). pgolf runs its record variant with lanes 1, inflight 0, no side
    batches and 1 phase row: the record's one-process order, so the scores must agree to float noise.

The record side goes through the record script itself (PGOLF_RECORD_SCRIPT, else ../shared/reference/pr1855 or
.ref/pr1855 under the repository) with shared/reference/shim standing in for FlashAttention 3 (FA3_SHIM, default
``torch``: document-exact varlen attention for its phase SGD; its TTT rows use the shim's dense causal SDPA). The
harness builds the record's model as its deserialize does (bf16, then its restore_fp32_params), compiles its
forward_ttt with dynamic shapes and warms it up on random tokens as its main() does, but in eval mode (its own
main warms up in train mode and recompiles inside its timer: ``--record-train-mode-warmup`` keeps that), then times
``eval_val_ttt_phased`` alone. pgolf's time is the TTT score time of ``run_ttt`` (its warm-up is reported apart).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK, CTX, PER_BATCH, PREFIX_DOCS, PHASES = 48, 2048, 64, 2500, 3
RECORD_ENV = {  # the record run's settings (its logs' header; shared/reference/side_by_side.sh)
    "VOCAB_SIZE": "8192", "CASEOPS_ENABLED": "1", "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5",
    "GATE_WINDOW": "12", "SMEAR_GATE_ENABLED": "1", "FUSED_CE_ENABLED": "1", "TTT_LORA_RANK": "80",
    "TTT_LORA_ALPHA": "144", "TTT_WARM_START_A": "1", "TTT_LORA_LR": "0.0001", "TTT_BETA1": "0", "TTT_BETA2": "0.99",
    "TTT_WEIGHT_DECAY": "0.5", "TTT_CHUNK_SIZE": str(CHUNK), "TTT_EVAL_SEQ_LEN": str(CTX), "EVAL_SEQ_LEN": "2048",
    "TTT_BATCH_SIZE": str(PER_BATCH), "TTT_GRAD_STEPS": "1", "TTT_K_LORA": "1", "TTT_MLP_LORA": "1", "TTT_O_LORA": "1",
    "TTT_OPTIMIZER": "adam", "TTT_EVAL_BATCHES": "", "VAL_DOC_FRACTION": "1.0", "PHASED_TTT_NUM_PHASES": str(PHASES),
    "GLOBAL_TTT_LR": "0.001", "GLOBAL_TTT_MOMENTUM": "0.9", "GLOBAL_TTT_EPOCHS": "1", "GLOBAL_TTT_CHUNK_TOKENS": "32768",
    "GLOBAL_TTT_BATCH_SEQS": "32", "GLOBAL_TTT_GRAD_CLIP": "1.0", "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES": "1",
    "GLOBAL_TTT_WARMUP_CHUNKS": "0",
}


def record_script(arg: str | None) -> Path:
    candidates = [arg, os.environ.get("PGOLF_RECORD_SCRIPT"), ROOT.parent / "shared/reference/pr1855/train_gpt.py",
                  ROOT / ".ref/pr1855/train_gpt.py"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    sys.exit(f"record script not found (tried {[str(c) for c in candidates if c]}); pass --record-script")


# ---------------------------------------------------------------------------------------------- shared inputs


def build_inputs(args):
    """(pgolf model on CPU, float32; ValidationSet) - the same on both sides."""
    import torch

    from pgolf.config import load_run_config
    from pgolf.evaluate.valdata import from_tokens, load_validation
    from pgolf.model.gpt import GPT

    if args.artifact:
        from pgolf.evaluate.stage import load_model_from_artifact

        model = load_model_from_artifact(args.artifact, "cpu")[0]
    else:
        cfg = load_run_config(ROOT / "config.yaml").model
        torch.manual_seed(args.seed)
        model = GPT(cfg)
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("attn.o.weight", "mlp.down.weight", "attn.gate.weight", "smear.gate.weight")):
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
    if args.data_dir:
        val = load_validation(args.data_dir, max_docs=args.docs, score_next_bos=True)
    else:
        lengths = np.loadtxt(ROOT / "benchmarks" / "record_doc_lengths.txt", dtype=np.int64)
        lengths = lengths[lengths <= args.max_doc_len]
        pick = lengths[np.linspace(0, len(lengths) - 1, args.docs).round().astype(np.int64)] - 1  # own tokens
        rng = np.random.default_rng(args.seed)
        rng.shuffle(pick)
        docs = [np.concatenate([[1], rng.integers(8, model.cfg.vocab_size, size=int(n) - 1)]) for n in pick]
        tokens = np.concatenate(docs).astype(np.uint16)
        nbytes = np.where(tokens == 1, 0, rng.integers(1, 5, size=len(tokens))).astype(np.int32)
        val = from_tokens(tokens, nbytes, score_next_bos=True)
    model.looping = model.cfg.loop_count > 1
    for p in model.parameters():
        p.requires_grad_(False)
    return model, val


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def boundaries(num_docs: int) -> tuple[int, ...]:
    prefix = min(num_docs, PREFIX_DOCS)
    return tuple(prefix * (k + 1) // PHASES for k in range(PHASES))


# ---------------------------------------------------------------------------------------------------- record


def run_record(args) -> dict:
    import torch

    model, val = build_inputs(args)  # pgolf (and its attention probe) imported BEFORE the shim is on sys.path
    script = record_script(args.record_script)
    os.environ.update(RECORD_ENV)
    os.environ.update({"PHASED_TTT_PREFIX_DOCS": str(min(val.num_docs, PREFIX_DOCS)), "RUN_ID": f"ttt_sbs_{uuid.uuid4().hex[:8]}",
                       "FA3_SHIM": args.fa3_shim, "SEED": str(args.seed), "TTT_BATCH_SIZE": str(args.batch_docs)})
    device = torch.device(args.device)
    if device.type == "cpu":  # a smoke check of this harness: the test suite's CPU loader (triton stub, exact attention)
        os.environ["PGOLF_RECORD_SCRIPT"] = str(script)
        sys.path.insert(0, str(ROOT / "tests"))
        import record_oracle

        mod = record_oracle.load_record()
    else:
        sys.path.insert(0, str(script.parent.parent / "shim"))
        spec = importlib.util.spec_from_file_location("pr1855_train_gpt", script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["pr1855_train_gpt"] = mod
        spec.loader.exec_module(mod)
        mod.BOS_ID = 1  # the record sets it in its first data loader; its TTT forward reads it
    h = mod.Hyperparameters()
    rec = mod.GPT(h).to(device)
    if device.type == "cuda":  # as the record's deserialize builds it
        rec = rec.bfloat16()
        mod.restore_fp32_params(rec)
    else:
        for block in rec.blocks:
            block.attn.rotary.inv_freq = model.rope_inv_freq.clone()  # bf16-rounded, as after the GPU cast
            block.mlp.use_fused = False
    L = model.cfg.num_layers
    with torch.no_grad():  # the name map pgolf -> record (tests/oracle_ttt.py checks it covers every parameter)
        rec.tok_emb.weight.copy_(model.tok_emb.weight)
        for ours, theirs in ((model.skip_weights, rec.skip_weights), (model.skip_gates, rec.skip_gates),
                             (model.lane_post_lambdas, rec.parallel_post_lambdas),
                             (model.lane_resid_lambdas, rec.parallel_resid_lambdas),
                             (model.smear.gate.weight, rec.smear_gate.weight), (model.smear.lam, rec.smear_lambda)):
            theirs.copy_(ours)
        for i, b in enumerate(model.blocks):
            rb = rec.blocks[i]
            rec.qo_bank[i].copy_(b.attn.q.weight)
            rec.qo_bank[L + i].copy_(b.attn.o.weight)
            rec.kv_bank[i].copy_(b.attn.k.weight)
            rec.kv_bank[L + i].copy_(b.attn.v.weight)
            rec.mlp_up_bank[i].copy_(b.mlp.up.weight)
            rec.mlp_down_bank[i].copy_(b.mlp.down.weight)
            for ours, theirs in ((b.attn.q_gain, rb.attn.q_gain), (b.attn.gate.weight, rb.attn.attn_gate_w),
                                 (b.resid_mix, rb.resid_mix), (b.attn_scale, rb.attn_scale),
                                 (b.mlp_scale, rb.mlp_scale)):
                theirs.copy_(ours)
    rec.looping_active = True
    for p in rec.parameters():
        p.requires_grad_(False)
    for block in rec.blocks:  # the record's reset of its rotary caches before its TTT warm-up
        block.attn.rotary._cos_cached = block.attn.rotary._sin_cached = None
        block.attn.rotary._seq_len_cached = 0
        block.attn.rotary(h.ttt_eval_seq_len, device, torch.bfloat16)
    if not args.record_train_mode_warmup:
        rec.eval()
    compiled = (torch.compile(lambda x, y, lora: rec.forward_ttt(x, y, lora=lora), dynamic=True)
                if device.type == "cuda" else (lambda x, y, lora: rec.forward_ttt(x, y, lora=lora)))

    def fwd(x, y, lora):
        return compiled(x, y, lora)

    t = time.perf_counter()
    widths = (h.ttt_chunk_size, h.ttt_eval_seq_len) if device.type == "cuda" else ()  # CPU smoke: nothing to compile
    lora = mod.BatchedTTTLoRA(h.ttt_batch_size, rec, h.ttt_lora_rank).to(device)
    opt = torch.optim.AdamW(lora.parameters(), lr=h.ttt_lora_lr, betas=(h.ttt_beta1, h.ttt_beta2), eps=1e-10,
                            weight_decay=h.ttt_weight_decay, fused=True)
    for width in widths:  # random tokens only
        x = torch.randint(0, h.vocab_size, (h.ttt_batch_size, width), device=device)
        y = torch.randint(0, h.vocab_size, (h.ttt_batch_size, width), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(x, y, lora)
        loss[:, : h.ttt_chunk_size].mean(dim=-1).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del lora, opt
    sync(device)
    warmup_s = time.perf_counter() - t
    val_data = types.SimpleNamespace(val_tokens=torch.from_numpy(val.tokens.astype(np.int64)),
                                     val_bytes=torch.from_numpy(val.target_bytes.astype(np.int32)),
                                     caseops_enabled=True, base_bytes_lut=None, has_leading_space_lut=None,
                                     is_boundary_token_lut=None)
    rec.eval()
    torch.manual_seed(args.seed)  # adapter A: the global CPU generator, as pgolf's Generator(seed)
    sync(device)
    t = time.perf_counter()
    val_loss, val_bpb = mod.eval_val_ttt_phased(h, rec, device, val_data, forward_ttt_train=fwd)
    sync(device)
    return {"side": "record", "script": str(script), "fa3_shim": args.fa3_shim, "warmup_s": warmup_s,
            "score_s": time.perf_counter() - t, "val_loss": val_loss, "val_bpb": val_bpb,
            "train_mode_warmup": bool(args.record_train_mode_warmup)}


# ----------------------------------------------------------------------------------------------------- pgolf


def run_pgolf(args) -> dict:
    import dataclasses

    import torch

    from pgolf.config import load_run_config
    from pgolf.evaluate.stage import apply_embed_dtype
    from pgolf.evaluate.ttt import run_ttt

    model, val = build_inputs(args)
    device = torch.device(args.device)
    model = model.to(device)
    cfg = load_run_config(ROOT / "config.yaml").evaluate
    ttt = dataclasses.replace(cfg.ttt, variant="record", phase_boundaries_docs=boundaries(val.num_docs),
                              docs_per_batch=args.batch_docs)
    if args.pgolf_settings == "fidelity":
        ttt = dataclasses.replace(ttt, lanes=1, inflight=0, side_batches=False, phase_rows=1)
    ttt = dataclasses.replace(ttt, cuda_graphs=args.cuda_graphs)
    cfg = dataclasses.replace(cfg, ttt=ttt, compile=not args.eager and device.type == "cuda", diagnostics=False)
    apply_embed_dtype(model, cfg)
    out = run_ttt(model, val, cfg, args.seed, device=device)
    result = out.accumulator.result()
    out.ledger.check_complete(out.expected_targets)
    keep = ("steps", "batch_steps_here", "phases", "segments", "graphs_compiled_while_scoring", "compile_warmup_s",
            "cuda_graphs_captured", "cuda_graph_replays", "cuda_graph_failure", "phase_prefixes", "side_batches")
    return {"side": "pgolf", "settings": args.pgolf_settings, "cuda_graphs": args.cuda_graphs, "compile": cfg.compile,
            "embed_dtype": cfg.embed_dtype, "warmup_s": out.warmup_s, "score_s": out.score_s,
            "val_loss": result.val_loss, "val_bpb": result.val_bpb, "token_count": result.token_count,
            "summary": {k: out.summary[k] for k in keep if k in out.summary}}


# ------------------------------------------------------------------------------------------------------ main


def compare(out: Path) -> dict:
    sides = {s: json.loads((out / f"ttt_{s}.json").read_text()) for s in ("record", "pgolf")
             if (out / f"ttt_{s}.json").exists()}
    report = {"sides": sides}
    if len(sides) == 2:
        r, p = sides["record"], sides["pgolf"]
        report.update({"val_bpb_diff": p["val_bpb"] - r["val_bpb"], "val_loss_diff": p["val_loss"] - r["val_loss"],
                       "score_s_ratio_pgolf_over_record": p["score_s"] / r["score_s"]})
    for name, s in sides.items():
        print(f"{name:6s} warm-up {s['warmup_s']:7.1f} s  scoring {s['score_s']:7.1f} s  val_loss {s['val_loss']:.8f}"
              f"  val_bpb {s['val_bpb']:.8f}")
    if len(sides) == 2:
        print(f"pgolf - record: val_bpb {report['val_bpb_diff']:+.2e}, val_loss {report['val_loss_diff']:+.2e}; "
              f"scoring time ratio {report['score_s_ratio_pgolf_over_record']:.3f}")
    (out / "ttt_side_by_side.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["record", "pgolf", "both", "compare"], required=True)
    parser.add_argument("--out", required=True, help="folder for ttt_<side>.json and ttt_side_by_side.json")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--batch-docs", type=int, default=PER_BATCH, help="documents per TTT batch (the record: 64)")
    parser.add_argument("--max-doc-len", type=int, default=8192, help="synthetic documents: the longest length kept")
    parser.add_argument("--data-dir", help="real validation shards (the first --docs documents)")
    parser.add_argument("--artifact", help="a pgolf artifact (default: the record-size model, record init + noise)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--record-script")
    parser.add_argument("--fa3-shim", default="torch", choices=["torch", "fa4", "dense", "exact"])
    parser.add_argument("--record-train-mode-warmup", action="store_true",
                        help="warm the record's graph up in train mode, as its main() does (it then recompiles in its timer)")
    parser.add_argument("--pgolf-settings", choices=["fidelity", "recipe"], default="fidelity",
                        help="fidelity: lanes 1, inflight 0, no side batches, 1 phase row (the record's one-GPU "
                             "order); recipe: config.yaml's (8 lanes and side batches, all on this GPU)")
    parser.add_argument("--cuda-graphs", action="store_true", help="pgolf: replay CUDA graphs for the short steps")
    parser.add_argument("--eager", action="store_true", help="pgolf: no torch.compile")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke check of the harness)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.side in ("record", "pgolf"):
        result = run_record(args) if args.side == "record" else run_pgolf(args)
        result.update({"docs": args.docs, "data_dir": args.data_dir, "artifact": args.artifact, "seed": args.seed})
        (out / f"ttt_{args.side}.json").write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps({k: v for k, v in result.items() if k != "summary"}, default=str))
        return
    if args.side == "both":
        for side in ("record", "pgolf"):
            argv = [a for a in sys.argv[1:]]
            argv[argv.index("--side") + 1] = side
            subprocess.run([sys.executable, __file__, *argv], check=True)
    compare(out)


if __name__ == "__main__":
    main()
