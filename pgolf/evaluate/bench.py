"""``pgolf bench eval``: how fast a recipe's model scores and takes TTT-like steps on this device.

Scoring (no grad) and forward+backward throughput on synthetic packed rows (:func:`pgolf.train.bench.packed_rows`),
looping on as at evaluation, with projections of the time one pass over the record's validation tokens takes.
"""

from __future__ import annotations

from typing import Any, Optional

from pgolf.model.device import (
    CompileCounter,
    compile_model,
    device_name,
    memory_gib,
    reset_memory,
    resolve_device,
    time_steps,
    versions,
)
from pgolf.train.bench import BOS_ID, RECORD_VAL_TOKENS, packed_rows

def _token_nll(model, input_ids, target_ids, cu_seqlens, max_seqlen: int):
    """Per-token NLL [T] fp32 through the model's pieces and the (fused when enabled) softcapped CE."""
    from pgolf.model import kernels

    h = model.forward_hidden(input_ids, cu_seqlens, max_seqlen)  # [T, d]
    logits = model.lm_head(h)  # [T, V]
    if model.use_fused_kernels:
        return kernels.softcapped_token_nll(logits, target_ids, model.cfg.logit_softcap)
    return kernels.softcapped_token_nll_reference(logits, target_ids, model.cfg.logit_softcap)


def bench_eval(
    run_cfg,
    *,
    steps: int = 5,
    warmup: int = 2,
    batch_tokens: Optional[int] = None,
    fused: bool = True,
    compile: Optional[bool] = None,
    compile_backend: Optional[str] = None,
    device_kind: str = "auto",
    val_tokens: int = RECORD_VAL_TOKENS,
    seed: int = 0,
    attention_backend: Optional[str] = None,
) -> dict[str, Any]:
    """Scoring throughput (no grad) and a TTT-like forward+backward throughput on packed rows, looping on.
    ``attention_backend`` overrides the recipe's ``model.attention_backend``."""
    import dataclasses

    import torch

    from pgolf.model import kernels
    from pgolf.model.gpt import GPT
    from pgolf.train.loop import autocast_for

    if steps < 1 or warmup < 0:
        raise ValueError(f"bench eval: expected steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    model_cfg, eval_cfg = run_cfg.model, run_cfg.evaluate
    if attention_backend is not None:
        model_cfg = dataclasses.replace(model_cfg, attention_backend=attention_backend)
    device = resolve_device(device_kind)
    compile = eval_cfg.compile if compile is None else compile
    compile_backend = compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    row_tokens = batch_tokens or eval_cfg.eval_batch_tokens
    torch.manual_seed(seed)
    model = GPT(model_cfg, train_seq_len=eval_cfg.eval_seq_len, bos_id=BOS_ID).to(device)
    model.use_fused_kernels = fused
    attention = model.set_attention_backend(device)  # before compiling: probes FlashAttention
    model.looping = model_cfg.loop_count > 1  # always on at evaluation (record.md)
    rows = packed_rows(row_tokens, model_cfg.vocab_size, eval_cfg.eval_seq_len, seed)
    fn = compile_model(lambda i, t, c, m: _token_nll(model, i, t, c, m), compile, compile_backend)

    def call(i: int, backward: bool):
        r = i % len(rows.inputs)
        args = [x[r].to(device, non_blocking=True) for x in (rows.inputs, rows.targets, rows.cu_seqlens)]
        with autocast_for(device):
            nll = fn(*args, rows.max_seqlen)
        if backward:
            nll.sum().backward()
        return nll

    results = {}
    for name, grad in (("score", False), ("ttt_step", True)):
        counter = CompileCounter()
        with torch.set_grad_enabled(grad):
            warm_s, _ = time_steps(lambda i: call(i, grad), warmup, device)
            warm_counts = counter.delta()
            reset_memory(device)
            timed = CompileCounter()
            total_s, _ = time_steps(lambda i: call(warmup + i, grad), steps, device)
            timed_counts = timed.delta()
        model.zero_grad(set_to_none=True)
        alloc, reserved = memory_gib(device)
        tokens_per_s = steps * rows.tokens / total_s
        results[name] = {
            "warmup_seconds": warm_s,
            "graphs_compiled_in_warmup": warm_counts["graphs_compiled"],
            "graph_breaks_in_warmup": warm_counts["graph_breaks"],
            "recompiles_in_timed_steps": timed_counts["graphs_compiled"],
            "ms_per_row": 1000.0 * total_s / steps,
            "tokens_per_s": tokens_per_s,
            "peak_memory_allocated_gib": alloc,
            "peak_memory_reserved_gib": reserved,
        }
    score_tps, ttt_tps = results["score"]["tokens_per_s"], results["ttt_step"]["tokens_per_s"]
    return {
        "bench": "eval",
        "run": run_cfg.run,
        "device": device_name(device),
        "device_type": device.type,
        **versions(),
        "fused_kernels": bool(model.use_fused_kernels),
        "fused_kernels_active": bool(model.use_fused_kernels and device.type == "cuda" and kernels.TRITON_AVAILABLE),
        "attention_backend": attention,
        "compile": bool(compile),
        "compile_backend": compile_backend if compile else None,
        "looping": bool(model.looping),
        "row_tokens": rows.tokens,
        "eval_seq_len": eval_cfg.eval_seq_len,
        "cu_seqlens_shapes": rows.cu_shapes,
        "steps": steps,
        "warmup_steps": warmup,
        "score": results["score"],
        "ttt_step": results["ttt_step"],
        "val_tokens": val_tokens,
        # one pass of scoring over the validation tokens, and scoring + one forward/backward per token (TTT)
        "projected_scoring_seconds": val_tokens / score_tps,
        "projected_ttt_seconds": val_tokens / score_tps + val_tokens / ttt_tps,
        "seed": seed,
    }


def eval_summary_line(result: dict[str, Any]) -> str:
    s, t = result["score"], result["ttt_step"]
    return (
        f"bench eval {result['run']} on {result['device']}: fused {'on' if result['fused_kernels_active'] else 'off'}, "
        f"attention {result['attention_backend']['resolved']}, "
        f"compile {result['compile_backend'] or 'off'}, rows of {result['row_tokens']:,} | score {s['tokens_per_s'] / 1e3:,.0f}K tok/s "
        f"| fwd+bwd {t['tokens_per_s'] / 1e3:,.0f}K tok/s | projected over {result['val_tokens']:,} tokens: "
        f"scoring {result['projected_scoring_seconds']:.0f}s, scoring + one TTT pass {result['projected_ttt_seconds']:.0f}s"
    )
