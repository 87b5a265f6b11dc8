"""The evaluation stage: exact bits per byte of a packed artifact on the validation set, with legal TTT.

``python -m pgolf.evaluate --artifact A --eval-json JSON --seed N --data-dir D --out OUT.json ...`` (run under
torchrun for N processes) and ``pgolf eval --artifact A --config C`` (people).

What is timed, against ``max_eval_seconds`` (600 s on 8xH100 in the rules):
  load_s    read + unpack + dequantize the artifact, build the model from the header's model config
  warmup_s  torch.compile warm-up on RANDOM tokens (never validation tokens; nothing is stepped)
  score_s   scoring, including every TTT update
  total_s   their sum
Reading the validation shards (``data_s``) and the diagnostic evaluations (pre-quant from the checkpoint,
post-quant from the artifact, both without TTT, after the timed part) are reported but not counted. The budget is
enforced (non-zero exit when exceeded) only in record mode on the record hardware (8 GPUs named H100); elsewhere
the figure is reported with ``"budget_applies": false``. A margin under ``warn_margin_seconds`` warns.

Every scored target is recorded in a :class:`pgolf.evaluate.ttt.Ledger`; the run fails unless every target was scored
exactly once, and TTT updates raise at once if they would use an unscored token (rule C3).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from pgolf.config import EvaluateConfig, ModelConfig, from_mapping, to_dict
from pgolf.io import Progress, atomic_write_json, read_json_object, sha256_file
from pgolf.evaluate.scoring import (  # noqa: F401  (bits_per_byte and ScoreResult are part of this module's API)
    NllRunner,
    ScoreAccumulator,
    ScoreResult,
    bits_per_byte,
    pack_documents,
    record_flat_mask,
    record_flat_rows,
)
from pgolf.compliance.provenance import RECORD_GPU_COUNT, is_record_gpu
from pgolf.evaluate.ledger import Ledger, LegalityError
from pgolf.evaluate.ttt import run_ttt
from pgolf.evaluate.valdata import ValidationSet, load_validation

PACK_REPORT_NAME = "pack_report.json"
# the ledger's per-rank counters that eval.json also gives summed over the ranks (``ledger.all_ranks``); the others
# are rank 0's (``positions_used_by_updates`` does not add up: every rank records a global SGD phase's positions)
LEDGER_COUNTS = ("score_calls", "updates", "update_positions_total", "scored_here")
EXIT_OVER_BUDGET = 3


class ArtifactHashError(ValueError):
    """The artifact's sha256 is not the one the pack stage recorded."""


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def refuse_in_record_mode(checkpoint_dir: str | Path) -> None:
    """Raise LegalityError when the checkpoint's metadata says it was trained on validation tokens (C3/C4).

    The evaluation calls this in record mode: a sweep's checkpoint must never be scored as a record."""
    from pgolf.train.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(Path(checkpoint_dir))
    tokens = meta.get("prequant_ttt_val_tokens") or 0
    if tokens:
        raise LegalityError(
            f"{checkpoint_dir}: the checkpoint was trained on {tokens:,} validation tokens before scoring "
            f"(pre-quant TTT, rules C3/C4): refused in record mode"
        )


PARAM_STORAGES = ("fp32", "record")


def checkpoint_param_storage(meta: dict) -> str:
    """The parameter storage a checkpoint was written under (``param_storage`` in its metadata or its train
    config; checkpoints from before the option are ``fp32``)."""
    storage = meta.get("param_storage") or (meta.get("train_config") or {}).get("param_storage") or "fp32"
    if storage not in PARAM_STORAGES:
        raise ValueError(f"checkpoint.json: param_storage {storage!r}, expected one of {PARAM_STORAGES}")
    return storage


def apply_eval_storage(state: dict[str, torch.Tensor], param_storage: str) -> dict[str, torch.Tensor]:
    """``evaluate.param_storage``: under ``record`` the token embedding's values are rounded to bf16 (the record
    builds every evaluated model as a bf16 template and casts the loaded or dequantized weights to its dtypes;
    only ``tok_emb.weight`` stays bf16 there). Held in float32 here; every other tensor is unchanged. The artifact's
    model is built under ``evaluate.param_storage``, a checkpoint's (pre-quant) under the storage it was trained
    under (what the record's pre-quant diagnostic scores: its live model)."""
    if param_storage not in PARAM_STORAGES:
        raise ValueError(f"evaluate.param_storage: expected one of {PARAM_STORAGES}, got {param_storage!r}")
    if param_storage == "record" and "tok_emb.weight" in state:
        state = {**state, "tok_emb.weight": state["tok_emb.weight"].to(torch.bfloat16).to(torch.float32)}
    return state


def _build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], device, where: str, param_storage: str = "fp32"):
    from pgolf.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device=device)
    model.reset_buffers()  # the non-persistent RoPE buffers: to_empty left them uninitialized
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shapes = [n for n in set(expected) & set(got) if expected[n] != got[n]]
        raise ValueError(f"{where}: weights do not match the model config (missing {missing[:5]}, unexpected {extra[:5]}, "
                         f"shape differs {sorted(shapes)[:5]})")
    state = apply_eval_storage({k: v.to(torch.float32) for k, v in state.items()}, param_storage)
    model.load_state_dict(state, strict=True)
    model.looping = cfg.loop_count > 1  # depth recurrence is always on at evaluation
    model.set_attention_backend(device)  # model_config.attention_backend on this device (before any compile)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_model_from_artifact(path: str | Path, device: str | torch.device = "cpu",
                             param_storage: str = "fp32") -> tuple[Any, dict, dict]:
    """Unpack, dequantize and build the model from the artifact header's model config (never from YAML), with
    ``evaluate.param_storage`` applied to the dequantized weights (:func:`apply_eval_storage`).

    Returns ``(model, header, timings)`` with timings ``read_s, unpack_s, dequantize_s, build_s, load_s``.
    """
    from pgolf.quantize.weights import dequantize_state
    from pgolf.artifact.format import check_against_model_config, unpack

    path = Path(path)
    t0 = time.perf_counter()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: artifact not found") from None
    t1 = time.perf_counter()
    qm, header = unpack(data, str(path))
    t2 = time.perf_counter()
    state = dequantize_state(qm)
    t3 = time.perf_counter()
    if "model_config" not in header:
        raise ValueError(f"{path}: artifact header has no model_config")
    cfg = from_mapping(ModelConfig, header["model_config"], f"{path}: header.model_config")
    from pgolf.model.gpt import build_meta

    check_against_model_config(header, {n: tuple(p.shape) for n, p in build_meta(cfg).named_parameters()}, str(path))
    model = _build_model(cfg, state, device, str(path), param_storage)
    _sync(torch.device(device))
    t4 = time.perf_counter()
    timings = {"read_s": t1 - t0, "unpack_s": t2 - t1, "dequantize_s": t3 - t2, "build_s": t4 - t3, "load_s": t4 - t0}
    return model, header, timings


def load_model_from_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu",
                               param_storage: Optional[str] = None) -> tuple[Any, dict]:
    """The trained (pre-quantization) model of a training checkpoint, for the pre-quant diagnostic.

    ``param_storage`` (``evaluate.param_storage``) must be the checkpoint's own storage; None takes it from the
    checkpoint."""
    from pgolf.train.checkpoint import load_checkpoint, model_config_of

    state, meta = load_checkpoint(ckpt_dir)
    cfg = model_config_of(meta, f"{ckpt_dir}/checkpoint.json")
    storage = checkpoint_param_storage(meta)
    if param_storage is not None and param_storage != storage:
        raise ValueError(f"{ckpt_dir}/checkpoint.json: the weights were written under param_storage {storage!r}, but "
                         f"evaluate.param_storage is {param_storage!r}; expected the same storage for training and evaluation")
    return _build_model(cfg, state, device, str(ckpt_dir), storage), meta


def apply_embed_dtype(model, cfg: EvaluateConfig) -> None:
    """``evaluate.embed_dtype`` bfloat16 on CUDA: the token embedding (and tied head) in bf16, as the record
    evaluates (CPU keeps float32: no autocast there to reconcile the dtypes)."""
    if cfg.embed_dtype == "bfloat16" and model.tok_emb.weight.device.type == "cuda":
        model.tok_emb.to(torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------------
# Scoring without TTT (diagnostics, and mode "none")
# --------------------------------------------------------------------------------------------------------------


def validation_for(cfg: EvaluateConfig, data_dir: str | Path, tokenizer=None, vocab_size: Optional[int] = None):
    """The validation set as ``cfg`` defines it: truncation (``stream_truncation``) and targets (``score_next_bos``)."""
    return load_validation(data_dir, tokenizer_path=tokenizer, byte_accounting=cfg.byte_accounting,
                           max_docs=cfg.max_docs, vocab_size=vocab_size, score_next_bos=cfg.score_next_bos,
                           truncate_multiple=cfg.eval_seq_len if cfg.stream_truncation == "record" else 0)


def diagnostic_rows(val: ValidationSet, cfg: EvaluateConfig):
    """Every document in stream order, packed into rows of ``eval_batch_tokens`` with ``eval_seq_len`` windows."""
    return pack_documents(val, np.arange(val.num_docs), cfg.eval_batch_tokens, cfg.eval_seq_len, pad=cfg.compile)


def new_runner(model, cfg: EvaluateConfig) -> NllRunner:
    return NllRunner(model, next(model.parameters()).device, compile=cfg.compile, softcap_dtype=cfg.softcap_dtype)


def warmup_scoring(runner: NllRunner, val: ValidationSet, cfg: EvaluateConfig, seed: int) -> float:
    """Compile warm-up for :func:`score_documents`: the row shapes it will see, filled with random tokens."""
    if not (cfg.compile and cfg.compile_warmup_steps > 0):
        return 0.0
    shapes = sorted({runner.shape_of(row) for row in diagnostic_rows(val, cfg)})
    with torch.no_grad():
        return runner.warmup(shapes, cfg.compile_warmup_steps, backward=False, seed=seed + 7_919)


def score_documents(
    model,
    val: ValidationSet,
    cfg: EvaluateConfig,
    *,
    runner: Optional[NllRunner] = None,
    dist_info=None,
    keep_tokens: bool = False,
    write: Optional[Callable[[dict], None]] = None,
    what: str = "score",
) -> tuple[ScoreResult, ScoreAccumulator, Ledger]:
    """Score every target once under no_grad (no TTT); rows go round-robin to processes. Checks completeness."""
    return _score_rows(model, val, cfg, diagnostic_rows(val, cfg), val.target_mask(), runner=runner,
                       dist_info=dist_info, keep_tokens=keep_tokens, write=write, what=what)


def score_record_flat(model, val: ValidationSet, cfg: EvaluateConfig, **kwargs) -> tuple[ScoreResult, ScoreAccumulator, Ledger]:
    """PR #1855's ``eval_val`` (``evaluate.diagnostic_scoring: record_flat``): the rows of
    :func:`pgolf.evaluate.scoring.record_flat_rows` for the record's world size, round-robin over this run's
    processes; checks that exactly the partition's targets were scored once."""
    args = (val, cfg.eval_seq_len, cfg.record_flat_batch_seqs, cfg.record_flat_world_size)
    expected = record_flat_mask(*args)
    if not expected.any():
        raise ValueError(f"evaluate.diagnostic_scoring 'record_flat': {val.num_positions:,} validation tokens give no whole batch "
                         f"of {cfg.record_flat_batch_seqs} x {cfg.eval_seq_len} tokens per rank over {cfg.record_flat_world_size} "
                         f"ranks; use 'documents' (or a smaller record_flat_batch_seqs) for so short a stream")
    return _score_rows(model, val, cfg, record_flat_rows(*args), expected, **kwargs)


def score_diagnostic(model, val: ValidationSet, cfg: EvaluateConfig, **kwargs) -> ScoreResult:
    """The no-TTT diagnostic score ``evaluate.diagnostic_scoring`` names (pre-/post-quant)."""
    score = score_record_flat if cfg.diagnostic_scoring == "record_flat" else score_documents
    return score(model, val, cfg, **kwargs)[0]


def _score_rows(model, val: ValidationSet, cfg: EvaluateConfig, rows, expected: np.ndarray, *,
                runner: Optional[NllRunner] = None, dist_info=None, keep_tokens: bool = False,
                write: Optional[Callable[[dict], None]] = None, what: str = "score"):
    device = next(model.parameters()).device
    runner = runner or new_runner(model, cfg)
    if model.cfg.loop_count > 1:
        model.looping = True
    rank = dist_info.rank if dist_info is not None else 0
    world = dist_info.world_size if dist_info is not None else 1
    acc = ScoreAccumulator(val, keep_tokens)
    ledger = Ledger(val.num_positions)
    total = int(np.count_nonzero(expected))
    progress = Progress(what, total, val.num_docs, cfg.progress_every_seconds, rank == 0, write, world)
    with torch.no_grad():
        for i, row in enumerate(rows):
            if i % world != rank:
                continue
            nll = runner(row)
            mask = row.scored
            positions = row.target_positions[mask]
            values = nll.float().cpu().numpy()[mask].astype(np.float64)
            ledger.record_scored(positions)
            acc.add(positions, values)
            starts = np.count_nonzero(row.input_ids[mask] == 1)
            progress.update(len(positions), docs=int(starts))
    _sync(device)
    ledger.check_complete(expected, ledger.scored_counts(dist_info))
    return acc.result(dist_info), acc, ledger


def score_model(model, val: ValidationSet, cfg: EvaluateConfig, **kwargs) -> ScoreResult:
    """Exact bpb of ``model`` on ``val`` without TTT (within-document windows, each target scored once)."""
    return score_documents(model, val, cfg, **kwargs)[0]


# --------------------------------------------------------------------------------------------------------------
# Checks: artifact hash, time budget
# --------------------------------------------------------------------------------------------------------------


def check_artifact_hash(artifact: str | Path, pack_report: str | Path | None = None, allow_mismatch: bool = False) -> dict:
    """Compare the artifact's sha256 with ``artifact_sha256`` of the pack report (``pack_report.json`` beside it).

    Raises :class:`ArtifactHashError` on a mismatch or a missing report unless ``allow_mismatch``.
    """
    artifact = Path(artifact)
    if not artifact.exists():
        raise FileNotFoundError(f"{artifact}: artifact not found")
    actual = sha256_file(artifact)
    report_path = Path(pack_report) if pack_report else artifact.parent / PACK_REPORT_NAME
    recorded = None
    problem = None
    if not report_path.exists():
        problem = f"{report_path}: pack report not found, so the artifact's sha256 cannot be checked"
    else:
        recorded = read_json_object(report_path, "pack report").get("artifact_sha256")
        if not isinstance(recorded, str):
            problem = f"{report_path}: no 'artifact_sha256' string"
        elif recorded != actual:
            problem = (f"{artifact}: sha256 {actual} differs from the one the pack stage recorded in {report_path} "
                       f"({recorded}); the artifact was changed after packing")
    if problem and not allow_mismatch:
        raise ArtifactHashError(problem + " (pass --allow-hash-mismatch to evaluate it anyway)")
    return {"artifact_sha256": actual, "recorded_sha256": recorded, "pack_report": str(report_path),
            "hash_ok": problem is None, "hash_problem": problem}


def on_record_hardware(world_size: int) -> bool:
    """8 processes, each on an H100 SXM (the hardware the 600 s rule is stated for)."""
    return (world_size == RECORD_GPU_COUNT and torch.cuda.is_available()
            and is_record_gpu(torch.cuda.get_device_name(torch.cuda.current_device())))


def budget_report(total_s: float, cfg: EvaluateConfig, mode: str, record_hardware: bool) -> dict:
    """The evaluation-time verdict; ``applies`` only in record mode on the record hardware."""
    margin = cfg.max_eval_seconds - total_s
    applies = mode == "record" and record_hardware
    warning = None
    if margin < 0:
        warning = f"evaluation took {total_s:.1f} s, over the {cfg.max_eval_seconds:.0f} s budget by {-margin:.1f} s"
    elif margin < cfg.warn_margin_seconds:
        warning = f"evaluation took {total_s:.1f} s: only {margin:.1f} s under the {cfg.max_eval_seconds:.0f} s budget"
    return {"max_eval_seconds": cfg.max_eval_seconds, "total_s": total_s, "margin_s": margin, "budget_applies": applies,
            "exceeded": margin < 0, "warning": warning}


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


def check_checkpoint_is_the_artifacts(checkpoint: str | Path, header: dict, artifact: str | Path) -> None:
    """Refuse a checkpoint other than the one the artifact was quantized from (its header's input hashes)."""
    from pgolf.train.checkpoint import read_checkpoint_meta

    expected = (header.get("input_hashes") or {}).get("checkpoint_weights_sha256")
    actual = read_checkpoint_meta(checkpoint).get("weights_sha256")
    if expected is not None and actual != expected:
        raise ValueError(f"{checkpoint}: weights sha256 {str(actual)[:16]}... are not those {artifact} was quantized "
                         f"from ({expected[:16]}...): its pre-quant score and checks would describe another model")


def run_evaluation(
    artifact: str | Path,
    cfg: EvaluateConfig,
    seed: int,
    data_dir: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    tokenizer: str | Path | None = None,
    pack_report: str | Path | None = None,
    mode: str = "record",
    allow_hash_mismatch: bool = False,
    metrics: str | Path | None = None,
    device_kind: str = "auto",
) -> tuple[dict, int]:
    """Evaluate one artifact; rank 0 writes ``out`` atomically. Returns (result dict, exit code)."""
    from pgolf.train.distributed import init_distributed, max_floats, shutdown, sum_ints
    from pgolf.compliance.provenance import code_hash, environment
    from pgolf.io import MetricsLog, progress, set_cpu_threads

    set_cpu_threads(cfg.cpu_threads)  # CPU evaluation: the same scores from the pipeline and train_gpt.py
    if mode not in ("record", "sweep"):
        raise ValueError(f"--mode: expected record or sweep, got {mode!r}")
    if mode == "record" and cfg.ttt.debug_update_before_score:
        raise LegalityError("evaluate.ttt.debug_update_before_score is an illegal ordering (C3): refused in record mode")
    if mode == "record" and cfg.max_docs:
        raise ValueError(f"evaluate.max_docs: a record run scores every validation document, got {cfg.max_docs}")
    if mode == "record" and checkpoint:  # (without one, pgolf comply checks the seed's own checkpoint)
        refuse_in_record_mode(checkpoint)  # pre-quant TTT on validation tokens (C3/C4); the pairing is checked below
    hash_info = check_artifact_hash(artifact, pack_report, allow_hash_mismatch)  # before any work
    info = init_distributed(device_kind)
    device = info.device
    out = Path(out)
    metrics_path = Path(metrics) if metrics else out.with_name(out.stem + "_metrics.jsonl")
    log = MetricsLog(metrics_path if info.is_main else None)  # a hidden partial file until the report is written
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)

    storage = {"evaluate": cfg.param_storage, "checkpoint": None}
    if checkpoint:  # the pre-quant model is built under the checkpoint's own storage; the artifact's under the config's
        from pgolf.train.checkpoint import read_checkpoint_meta

        storage["checkpoint"] = checkpoint_param_storage(read_checkpoint_meta(checkpoint))
        if storage["checkpoint"] != cfg.param_storage and info.is_main:
            print(f"pgolf evaluate: WARNING: {checkpoint} was trained under param_storage {storage['checkpoint']!r}, but "
                  f"evaluate.param_storage is {cfg.param_storage!r} (the record recipe uses 'record' for both)",
                  file=sys.stderr, flush=True)
    t = time.perf_counter()
    model, header, load_timings = load_model_from_artifact(artifact, device, cfg.param_storage)
    apply_embed_dtype(model, cfg)
    load_s = time.perf_counter() - t
    if checkpoint:  # the pre-quant score and the legality check must describe the artifact's own weights
        check_checkpoint_is_the_artifacts(checkpoint, header, artifact)
    attention = model.attention_choice
    t = time.perf_counter()
    val = validation_for(cfg, data_dir, tokenizer, model.cfg.vocab_size)
    data_s = time.perf_counter() - t
    log.write({"event": "eval_start", "docs": val.num_docs, "targets": val.target_count, "mode": cfg.ttt.mode,
               "world_size": info.world_size, "load_s": load_s, "data_s": data_s})

    ttt_summary: dict = {"mode": cfg.ttt.mode}
    if cfg.ttt.mode == "none":
        runner = new_runner(model, cfg)
        warmup_s = warmup_scoring(runner, val, cfg, seed)
        t = time.perf_counter()
        result, acc, ledger = score_documents(model, val, cfg, runner=runner, dist_info=info, write=log.write)
        score_s = time.perf_counter() - t
    else:
        outcome = run_ttt(model, val, cfg, seed, device=device, dist_info=info, write=log.write)
        warmup_s, score_s, ledger, acc = outcome.warmup_s, outcome.score_s, outcome.ledger, outcome.accumulator
        expected = outcome.expected_targets if outcome.expected_targets is not None else val.target_mask()
        ledger.check_complete(expected, ledger.scored_counts(info))
        result = acc.result(info)
        ttt_summary = outcome.summary
    # each rank timed itself: the slowest rank's times, so that every rank judges the budget on the same figures
    load_s, warmup_s, score_s, data_s = max_floats([load_s, warmup_s, score_s, data_s], info)
    # each rank kept its own ledger and step count: the run's totals beside rank 0's figures
    ledger_summary = ledger.summary()
    totals = sum_ints([ledger_summary[key] for key in LEDGER_COUNTS] + [int(ttt_summary.get("steps", 0))], info)
    ledger_summary["all_ranks"] = dict(zip(LEDGER_COUNTS, totals))
    if cfg.ttt.mode == "lora":  # per-document adapter steps, each rank its own documents (chunked's are global)
        ttt_summary = {**ttt_summary, "steps_all_ranks": totals[-1]}
    total_s = load_s + warmup_s + score_s
    timings = {"load_s": load_s, "warmup_s": warmup_s, "score_s": score_s, "total_s": total_s, "data_s": data_s,
               "load_detail": load_timings}
    # the score and its timings are on record before the (untimed) diagnostics, which may fail or be cut off
    log.write({"event": "eval_scored", **result.to_dict(), "timings": timings, "ttt": ttt_summary})
    if not math.isfinite(result.val_loss):  # a diverged adaptation: no score to report, and no eval.json
        raise FloatingPointError(f"the evaluation's loss is {result.val_loss} (evaluate.ttt.mode {cfg.ttt.mode!r}): "
                                 "a test-time training step diverged (its learning rate?); no eval.json is written")
    budget = budget_report(total_s, cfg, mode, on_record_hardware(info.world_size))
    if budget["warning"] and info.is_main:
        print(f"pgolf evaluate: WARNING: {budget['warning']}", file=sys.stderr, flush=True)

    diagnostics: dict[str, Any] = {}
    diag_start = time.perf_counter()
    if cfg.diagnostics:
        diagnostics["scoring"] = cfg.diagnostic_scoring
        if cfg.ttt.mode == "none" and cfg.diagnostic_scoring == "documents":
            diagnostics["post_quant"] = result.to_dict()
        else:
            if cfg.ttt.mode != "none":  # TTT changed the model: score the artifact's weights afresh
                del model
                model, _, _ = load_model_from_artifact(artifact, device, cfg.param_storage)
                apply_embed_dtype(model, cfg)
            diagnostics["post_quant"] = score_diagnostic(model, val, cfg, dist_info=info, write=log.write,
                                                         what="post-quant").to_dict()
        del model
        if checkpoint:
            trained, _ = load_model_from_checkpoint(checkpoint, device)
            apply_embed_dtype(trained, cfg)  # the record's live model too holds its embedding in bf16
            diagnostics["pre_quant"] = score_diagnostic(trained, val, cfg, dist_info=info, write=log.write,
                                                        what="pre-quant").to_dict()
            del trained
        else:
            diagnostics["pre_quant"] = None
        diagnostics["seconds"] = time.perf_counter() - diag_start

    report = {
        **result.to_dict(),
        "seed": seed,
        "mode": mode,
        "ttt_mode": cfg.ttt.mode,
        "byte_accounting": val.byte_accounting,
        "timings": timings,
        "budget": budget,
        "budget_applies": budget["budget_applies"],
        "ttt": ttt_summary,
        "ledger": {**ledger_summary, "targets_expected": result.token_count, "complete": True},
        "diagnostics": diagnostics,
        "artifact": {"path": str(artifact), "sha256": hash_info["artifact_sha256"], "hash_check": hash_info,
                     "input_hashes": header.get("input_hashes", {})},
        "artifact_sha256": hash_info["artifact_sha256"],
        "model_config": header.get("model_config"),
        "attention_backend": attention,
        "evaluate_config": to_dict(cfg),
        "param_storage": storage,
        "data": val.source,
        "world_size": info.world_size,
        "code_hash": code_hash(),
        "environment": environment(),
    }
    log.write({"event": "eval_done", **result.to_dict(), "timings": report["timings"]})
    log.commit()
    if info.is_main:
        atomic_write_json(out, report)
        print(f"val_bpb {result.val_bpb:.8f} val_loss {result.val_loss:.8f} ({result.token_count:,} targets, "
              f"{result.byte_sum:,} bytes) in {total_s:.1f} s", file=sys.stderr, flush=True)
        progress(f"val_bpb {result.val_bpb:.4f} on {val.num_docs:,} documents ({result.byte_sum:,} bytes) "
                 f"in {total_s:.0f} s", final=True)
    shutdown(info)
    code = EXIT_OVER_BUDGET if (budget["budget_applies"] and budget["exceeded"]) else 0
    return report, code
