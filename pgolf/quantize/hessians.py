"""The Hessian stage: GPTQ's input second moments ``H = X^T X / n`` per quantized matrix, from TRAINING data.

    pgolf hessians --checkpoint DIR --data-dir D --hessian-json JSON --seed N --mode record|sweep \
        --out hessians.pt --report hessian_report.json

GPTQ minimizes each matrix's output error ``||X (W - W_hat)^T||^2``, which depends on the inputs only through
``X^T X``. One forward pre-hook per input module (``GPT.hessian_inputs()``) accumulates that product in float32
while calibration batches run through the model:

- q, k and v read the same normalized attention input, so they share ONE tensor (hooked on ``attn.q``);
- the tied embedding is quantized as the LM head, so its H comes from the head's input (the final-norm output);
  an untied input embedding has no input activation (a one-hot lookup quantizes row by row), so it gets the
  identity, for which GPTQ reduces exactly to round-to-nearest;
- depth recurrence is ON when the model has it (set explicitly: ``looping`` is runtime state, and evaluation
  runs looped), so a looped layer's hook fires once per APPLICATION of the layer.

How ``n`` counts (``normalize``): ``rows`` (pgolf's) divides by the number of input rows the hook saw, i.e.
tokens x applications of that layer (a layer applied 3 times per forward sees 3 rows per token), so ``H`` is the
mean outer product per application, on the same scale for looped and unlooped layers; ``batches`` (the
record's) divides the sum by the number of calibration batches. GPTQ hardly depends on the scale of H (damping is
relative to ``mean(diag H)``; only codes on a rounding boundary can flip), the error figures of the quantize
report do.

Calibration reads only ``fineweb_train_*.bin`` (never validation): ``batches`` batches of ``batch_rows`` rows of
``seq_len`` tokens. ``sampler``: ``uniform`` (pgolf's) takes rows at seeded random offsets of the whole training
stream; ``record`` reproduces the record's shuffled-sequence sampler of rank ``sampler_rank`` of
``sampler_world_size`` (:func:`record_calibration_rows`; the record's artifact uses rank 0's Hessians). Each row is
an independent sequence (SmearGate sees no predecessor at a row start). ``attention``: ``documents`` (pgolf's)
keeps attention inside documents (BOS starts a segment, and so does every row start), as in training; ``rows``
(the record's) is causal over the whole row across documents, positions counted from the row start.
``forward_dtype``: ``autocast`` (pgolf's: fp32 weights, bf16 autocast on CUDA) or ``bfloat16`` (the record's: a
bf16 copy of the model without autocast, so the residual stream is bf16 too; the record's numerics up to kernel
differences, not bit for bit).

Time budget: the rules count every read of training data, so under pgolf's ``strict`` reading
(``train.budget_reading``) this pass belongs to the 600 s training budget. ``hessian_seconds`` is the wall time
of what a single-process record script would also do after its loop: read the calibration tokens and run the
hooked forwards (CUDA synchronized). Loading the checkpoint and building the model exist only because the
pipeline is staged, so they are reported separately and not counted. The report gives ``train_seconds`` (from
the training stage's train_summary.json), ``hessian_seconds`` and their sum against the train config's
``max_wallclock_seconds``; over it, a record-mode run exits with status 3 and writes no hessians. Under the ``record`` reading (PR #1855's run: the
cap bounds the loop, the Hessians run after it) only the loop is held to the cap; both figures are reported.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import Tensor

from pgolf.model.attention import build_cu_seqlens
from pgolf.config import HessianConfig, to_dict
from pgolf.data.loader import TokenStream
from pgolf.data.shards import BOS_ID, list_shards, read_shard
from pgolf.io import Countdown, atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file

# float32 X^T X on CUDA through TF32 tensor cores (inputs rounded to 11 significant bits, float32 accumulation):
# exact for the bf16 activations autocast produces, a 2^-11 rounding of the few fp32 ones (norm outputs, which the
# Linear itself rounds to bf16 anyway); several times faster than full fp32, and this pass is inside the budget
CUDA_MATMUL_PRECISION = "high"
EXIT_OVER_BUDGET = 3  # same status as the evaluation stage's budget refusal
HESSIANS_FORMAT = "pgolf-hessians"  # hessians.pt: {format, checkpoint_weights_sha256, matrices}
_OFFSET_STREAM_TAG = 0x4E55  # mixed into the seed so calibration offsets never reuse another stage's random stream


class HessianError(ValueError):
    """Calibration data or model does not allow a Hessian pass (no train shards, bad ids, hooks that never ran)."""


# --------------------------------------------------------------------------------------------------------------
# Calibration batches (training shards only)
# --------------------------------------------------------------------------------------------------------------


def calibration_offsets(total_tokens: int, cfg: HessianConfig, seed: int) -> np.ndarray:
    """Start offsets into the training stream, int64 ``[batches, batch_rows]``; a pure function of its inputs.

    Every row fits inside the stream (no wrap-around), so each offset names ``seq_len`` real training tokens.
    """
    if seed < 0:
        raise HessianError(f"seed: expected >= 0, got {seed}")
    if total_tokens < cfg.seq_len:
        raise HessianError(
            f"training stream has {total_tokens:,} tokens, fewer than one calibration row (hessians.seq_len={cfg.seq_len})"
        )
    rng = np.random.default_rng([seed, _OFFSET_STREAM_TAG])
    return rng.integers(0, total_tokens - cfg.seq_len + 1, size=(cfg.batches, cfg.batch_rows), dtype=np.int64)


def packed_rows_cu_seqlens(rows: Tensor, bos_id: int = BOS_ID) -> Tensor:
    """cu_seqlens (int32 ``[n_segments + 1]``) of independent rows ``[R, S]`` packed into one ``[R * S]`` row.

    Segments start at every BOS and at every row start (a row usually begins mid-document); no segment spans
    two rows and none is longer than S.
    """
    num_rows, row_tokens = rows.shape
    parts = []
    for r in range(num_rows):
        cu, _ = build_cu_seqlens(rows[r], bos_id=bos_id, max_seqlen=row_tokens)  # [n_r + 1], last = S
        parts.append(cu[:-1] + r * row_tokens)
    parts.append(torch.tensor([num_rows * row_tokens], dtype=torch.int32))
    return torch.cat(parts).to(torch.int32)


def record_calibration_rows(paths: list[Path], cfg: HessianConfig) -> tuple[np.ndarray, np.ndarray]:
    """The record's calibration rows (its ``ShuffledSequenceLoader`` of rank ``sampler_rank``): ``(rows uint16
    [batches, batch_rows, seq_len], where int64 [batches * batch_rows, 2] = (shard index, start))``.

    Rank r reads shards ``r, r + world, ...`` of the name-sorted list, with ``numpy PCG64(r)`` (not the run seed).
    Per shard of n tokens: a phase ``integers(p + 1)`` with ``p = min(seq_len - 1, max(0, n - seq_len - 1))`` (0
    when p is 0, drawing nothing) and a ``permutation`` of its ``(n - 1 - phase) // seq_len`` sequence starts. Each
    row picks a shard with probability proportional to its remaining starts (``choice(p=...)``) and takes its LAST
    remaining start; when every shard is used up all are reshuffled (in shard order).
    """
    files = sorted(paths, key=lambda p: p.name)[cfg.sampler_rank :: cfg.sampler_world_size]
    if not files:
        raise HessianError(
            f"sampler_rank {cfg.sampler_rank} of {cfg.sampler_world_size} has no training shard ({len(paths)} in all)"
        )
    shards = [read_shard(p) for p in files]
    rng = np.random.Generator(np.random.PCG64(cfg.sampler_rank))
    starts: list[list[int]] = [[] for _ in files]

    def shuffle(i: int) -> None:
        n = len(shards[i])
        top = min(cfg.seq_len - 1, max(0, n - cfg.seq_len - 1))
        phase = int(rng.integers(top + 1)) if top > 0 else 0
        starts[i] = (phase + rng.permutation((n - 1 - phase) // cfg.seq_len) * cfg.seq_len).tolist()

    for i in range(len(files)):
        shuffle(i)
    rows = np.empty((cfg.batches, cfg.batch_rows, cfg.seq_len), dtype=np.uint16)
    where = []
    for b in range(cfg.batches):
        left = np.array([len(s) for s in starts], dtype=np.float64)  # recounted per batch, as the record does
        for r in range(cfg.batch_rows):
            if left.sum() <= 0:
                for i in range(len(files)):
                    shuffle(i)
                left = np.array([len(s) for s in starts], dtype=np.float64)
                if left.sum() <= 0:
                    raise HessianError(f"training shards of rank {cfg.sampler_rank} hold no row of seq_len+1 tokens")
            i = int(rng.choice(len(files), p=left / left.sum()))
            start = starts[i].pop()
            left[i] -= 1
            rows[b, r] = shards[i][start : start + cfg.seq_len]
            where.append((i, start))
    return rows, np.array(where, dtype=np.int64)


def row_batch(rows: Tensor, attention: str = "documents") -> tuple[Tensor, Tensor, Tensor]:
    """Independent rows ``[R, S]`` as one packed batch ``(input_ids [R * S], cu_seqlens, smear_reset bool [R * S])``:
    segments at row starts (``rows``) or also at every BOS (``documents``); SmearGate resets at row starts."""
    num_rows, row_tokens = rows.shape
    if attention == "rows":
        cu = torch.arange(0, num_rows * row_tokens + 1, row_tokens, dtype=torch.int32)
    else:
        cu = packed_rows_cu_seqlens(rows)
    reset = torch.zeros(num_rows, row_tokens, dtype=torch.bool)
    reset[:, 0] = True
    return rows.reshape(-1), cu, reset.reshape(-1)


def _train_paths(data_dir: str | Path) -> list[Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: shards directory not found")
    paths = list_shards(data_dir, "train")
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no fineweb_train_*.bin shards (calibration uses training data only)")
    return paths


def _calibration(
    data_dir: str | Path, cfg: HessianConfig, seed: int
) -> tuple[TokenStream, np.ndarray, list[tuple[Tensor, Tensor, Tensor]]]:
    """(stream, positions of the rows, batches): positions are stream offsets (uniform) or (shard, start) pairs."""
    stream = TokenStream(_train_paths(data_dir))
    if cfg.sampler == "record":
        all_rows, where = record_calibration_rows(stream.paths, cfg)
    else:
        where = calibration_offsets(stream.total_tokens, cfg, seed)  # [batches, batch_rows]
        all_rows = np.stack([np.stack([stream.read(int(o), cfg.seq_len) for o in offs]) for offs in where])
    batches = [row_batch(torch.from_numpy(r.astype(np.int64)), cfg.attention) for r in all_rows]
    return stream, where, batches


def calibration_batches(data_dir: str | Path, cfg: HessianConfig, seed: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``cfg.batches`` packed calibration batches ``(input_ids int64 [batch_rows * seq_len], cu_seqlens int32,
    smear_reset bool)`` of :func:`row_batch`.

    Rows are ``seq_len`` consecutive tokens of the TRAINING stream (``fineweb_train_*.bin``): at
    :func:`calibration_offsets` (``sampler: uniform``) or :func:`record_calibration_rows` (``record``); validation
    shards are never opened.
    """
    return _calibration(data_dir, cfg, seed)[2]


# --------------------------------------------------------------------------------------------------------------
# Hooked accumulation
# --------------------------------------------------------------------------------------------------------------


def collect_hessians(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, ...]],
    device: str | torch.device,
    rows_out: Optional[dict[str, int]] = None,
    normalize: str = "rows",
    forward_dtype: str = "autocast",
) -> dict[str, Tensor]:
    """``{weight name: H [cols, cols] float32 (CPU)}`` for every matrix in ``model.hessian_inputs()``.

    ``batches``: ``(input_ids [T], cu_seqlens int32[, smear_reset bool [T]])`` packed rows (see
    :func:`calibration_batches`). The model must already be on ``device``; its ``looping`` flag is switched on
    for the pass when it has recurrence and restored afterwards. Sums are float32 on ``device``; on CUDA the
    products use TF32 (:data:`CUDA_MATMUL_PRECISION`, restored afterwards) and, with ``forward_dtype="autocast"``,
    forwards run under bf16 autocast; ``"bfloat16"`` runs a bf16 copy of the model without autocast. ``normalize``:
    ``"rows"`` or ``"batches"`` (module docstring). Weights whose input module is shared (q, k, v) map to the SAME
    tensor object. ``rows_out``, when given, receives the rows seen per input module (tokens x applications).
    """
    if normalize not in ("rows", "batches") or forward_dtype not in ("autocast", "bfloat16"):
        raise HessianError(f"normalize {normalize!r} / forward_dtype {forward_dtype!r}: expected rows|batches, autocast|bfloat16")
    device = torch.device(device)
    if forward_dtype == "bfloat16":
        model = copy.deepcopy(model).to(torch.bfloat16)  # the record's bf16 model: every activation bf16
    inputs = model.hessian_inputs()  # weight name -> input module name (or None)
    params = dict(model.named_parameters())
    module_names = sorted({m for m in inputs.values() if m is not None})
    sums: dict[str, Tensor] = {}
    rows_seen: dict[str, int] = {m: 0 for m in module_names}

    def make_hook(module_name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            # autocast would run these products in bf16 (and return bf16): the sums must stay float32
            with torch.autocast(device_type=x.device.type, enabled=False):
                x2 = x.reshape(-1, x.shape[-1]).float()  # [rows, cols]
                if module_name in sums:
                    sums[module_name].addmm_(x2.T, x2)
                else:
                    sums[module_name] = x2.T @ x2  # [cols, cols] float32
            rows_seen[module_name] += x2.shape[0]  # a static shape: no device sync

        return hook

    handles = [model.get_submodule(m).register_forward_pre_hook(make_hook(m)) for m in module_names]
    was_looping, was_training = model.looping, model.training
    model.looping = model.cfg.loop_count > 1
    model.eval()
    on_cuda_autocast = device.type == "cuda" and forward_dtype == "autocast"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda_autocast else contextlib.nullcontext()
    n_batches = 0
    previous_precision = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        torch.set_float32_matmul_precision(CUDA_MATMUL_PRECISION)
    try:
        batches = list(batches)
        countdown = Countdown("calibration batch", len(batches))
        with torch.inference_mode(), autocast:
            for done, (input_ids, cu_seqlens, *rest) in enumerate(batches, start=1):
                countdown.update(done)
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
                ids = input_ids.to(device, non_blocking=True)
                cu = cu_seqlens.to(device, non_blocking=True)
                reset = rest[0].to(device, non_blocking=True) if rest else None
                # rows flattened into one [T]: every row starts a segment, so per-segment RoPE positions restart
                # at each row as the record's [rows, length] calibration batches do (row positions would run on)
                hidden = model.forward_hidden(ids, cu, max_seqlen, smear_reset=reset, rope_positions="segment")  # [T, d]
                model.lm_head(hidden)  # only its pre-hook matters: the tied embedding's H is the head input
                n_batches += 1
    finally:
        torch.set_float32_matmul_precision(previous_precision)
        for handle in handles:
            handle.remove()
        model.looping = was_looping
        model.train(was_training)

    never = [m for m in module_names if rows_seen[m] == 0]
    if never:
        raise HessianError(f"Hessian hooks never ran for {', '.join(never)} (no batches, or modules bypassed)")
    per_module = {m: (sums[m] / (n_batches if normalize == "batches" else rows_seen[m])).cpu() for m in module_names}
    out: dict[str, Tensor] = {}
    for weight_name, module_name in sorted(inputs.items()):
        cols = params[weight_name].shape[1]
        H = per_module[module_name] if module_name is not None else torch.eye(cols, dtype=torch.float32)
        if H.shape != (cols, cols):
            raise HessianError(
                f"{weight_name}: input of {module_name} has {H.shape[0]} features, the weight has {cols} columns"
            )
        out[weight_name] = H
    if rows_out is not None:
        rows_out.update(rows_seen)
    return out


# --------------------------------------------------------------------------------------------------------------
# Budget check
# --------------------------------------------------------------------------------------------------------------


BUDGET_READINGS = ("strict", "record")  # see TrainConfig.budget_reading


def budget_check(
    train_seconds: Optional[float],
    hessian_seconds: float,
    max_wallclock_seconds: float,
    budget_reading: str = "strict",
) -> dict[str, Any]:
    """The training budget under ``budget_reading`` (a cap of 0 means a step-based run: nothing to check).

    ``strict``: training + Hessians <= cap. ``record``: training <= cap (the Hessians after the loop are not
    counted, as in PR #1855's run); the strict sum is still reported in the message.
    """
    if budget_reading not in BUDGET_READINGS:
        raise ValueError(f"budget_reading: expected one of {BUDGET_READINGS}, got {budget_reading!r}")
    total = None if train_seconds is None else train_seconds + hessian_seconds
    result: dict[str, Any] = {
        "train_seconds": train_seconds,
        "hessian_seconds": hessian_seconds,
        "train_plus_hessian_seconds": total,
        "max_wallclock_seconds": max_wallclock_seconds,
        "budget_reading": budget_reading,
        "budget_applies": max_wallclock_seconds > 0,
        "within_budget": None,
        "message": "",
    }
    if max_wallclock_seconds <= 0:
        result["message"] = "no wallclock cap (step-based training): the budget does not apply"
        return result
    if total is None:
        result["within_budget"] = False
        result["message"] = "neither train_summary.json nor the checkpoint records train_seconds, so the training budget cannot be checked"
        return result

    def relation(seconds: float) -> str:
        return "within" if seconds <= max_wallclock_seconds else f"OVER by {seconds - max_wallclock_seconds:.2f} s"

    strict = f"train {train_seconds:.2f} s + Hessians {hessian_seconds:.2f} s = {total:.2f} s"
    if budget_reading == "strict":
        result["within_budget"] = total <= max_wallclock_seconds
        result["message"] = f"{strict}: {relation(total)} the {max_wallclock_seconds:g} s training budget"
    else:
        result["within_budget"] = train_seconds <= max_wallclock_seconds
        result["message"] = (
            f"reading 'record' (Hessians after the loop, uncounted): train {train_seconds:.2f} s {relation(train_seconds)} "
            f"the {max_wallclock_seconds:g} s budget; strict reading: {strict}, {relation(total)}"
        )
    return result


# --------------------------------------------------------------------------------------------------------------
# Stage entry
# --------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pick_device(kind: str) -> torch.device:
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(kind)


def _train_seconds(checkpoint: str | Path, meta: dict[str, Any]) -> Optional[float]:
    """The training loop's seconds: from ``train_summary.json`` beside the checkpoint folder (the training stage's
    measurements; checkpoint.json holds none), else from checkpoint.json (checkpoints written before that)."""
    summary_path = Path(checkpoint).parent / "train_summary.json"
    if summary_path.exists():
        value = json.loads(summary_path.read_text(encoding="utf-8")).get("train_seconds")
        if isinstance(value, (int, float)):
            return float(value)
    return meta.get("train_seconds")


def run_hessian_stage(
    checkpoint: str | Path,
    data_dir: str | Path,
    cfg: HessianConfig,
    seed: int,
    out: str | Path,
    report_path: str | Path,
    mode: str = "record",
    device_kind: str = "auto",
) -> tuple[dict[str, Any], int]:
    """Run the stage; returns ``(report, exit status)``. Writes ``out`` unless a record-mode budget check fails."""
    from pgolf.train.checkpoint import load_checkpoint, model_config_of
    from pgolf.model.gpt import GPT
    from pgolf.io import set_cpu_threads

    set_cpu_threads(cfg.cpu_threads)  # x.T @ x on the CPU: the same sums from the pipeline and train_gpt.py
    device = _pick_device(device_kind)
    t_load = time.perf_counter()
    state, meta = load_checkpoint(checkpoint)
    model_cfg = model_config_of(meta, f"{checkpoint}/checkpoint.json")
    model = GPT(model_cfg, train_seq_len=cfg.seq_len, bos_id=BOS_ID)
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.set_attention_backend(device)  # model_config.attention_backend on this device
    _sync(device)
    load_seconds = time.perf_counter() - t_load

    # ---- counted: calibration read + hooked forwards (what a single-process record script does after its loop)
    t0 = time.perf_counter()
    stream, offsets, batches = _calibration(data_dir, cfg, seed)
    t1 = time.perf_counter()
    top_id = max(int(batch[0].max()) for batch in batches)
    if top_id >= model_cfg.vocab_size:
        raise HessianError(f"{data_dir}: training token id {top_id} >= model vocab_size {model_cfg.vocab_size}")
    rows_seen: dict[str, int] = {}
    hessians = collect_hessians(model, batches, device, rows_out=rows_seen, normalize=cfg.normalize,
                                forward_dtype=cfg.forward_dtype)
    _sync(device)
    t2 = time.perf_counter()
    hessian_seconds = t2 - t0

    train_cfg = meta.get("train_config") or {}
    budget = budget_check(
        _train_seconds(checkpoint, meta), hessian_seconds, float(train_cfg.get("max_wallclock_seconds", 0.0)),
        train_cfg.get("budget_reading", "strict"),  # checkpoints from before the option: pgolf's strict reading
    )
    refused = mode == "record" and budget["budget_applies"] and not budget["within_budget"]

    inputs = model.hessian_inputs()
    report: dict[str, Any] = {
        "stage": "hessians",
        "mode": mode,
        "seed": seed,
        "hessian_config": to_dict(cfg),
        "device": str(device),
        "xtx_matmul": "tf32" if device.type == "cuda" else "fp32",
        "checkpoint": str(checkpoint),
        "checkpoint_weights_sha256": meta.get("weights_sha256"),
        "data_dir": str(data_dir),
        "train_shards": [p.name for p in stream.paths],
        "train_stream_tokens": stream.total_tokens,
        "calibration_tokens": cfg.batches * cfg.batch_rows * cfg.seq_len,
        "calibration_offsets_sha256": sha256_bytes(offsets.astype("<i8").tobytes()),
        "looping": model_cfg.loop_count > 1,
        "block_applications": len(model.virtual_layers(looping=model_cfg.loop_count > 1)),
        "matrices": {
            name: {
                "input_module": inputs[name],
                "rows_seen": rows_seen.get(inputs[name]) if inputs[name] else None,
                "cols": int(H.shape[0]),
                "mean_diag": float(H.diagonal().mean()),
            }
            for name, H in sorted(hessians.items())
        },
        "data_read_seconds": t1 - t0,
        "forward_seconds": t2 - t1,
        "not_counted": {"load_checkpoint_and_build_seconds": load_seconds},
        "reserve_seconds": train_cfg.get("reserve_seconds"),
        **budget,
        "refused": refused,
        "hessians_sha256": None,
    }
    if not refused:
        buffer = io.BytesIO()  # through memory: torch.save would name its zip records after the temp file
        # the file names the checkpoint it was collected from: quantize refuses Hessians of other weights
        torch.save({"format": HESSIANS_FORMAT, "checkpoint_weights_sha256": meta.get("weights_sha256"),
                    "matrices": dict(sorted(hessians.items()))}, buffer)
        atomic_write_bytes(out, buffer.getvalue())
        report["hessians_sha256"] = sha256_file(out)
    else:  # an earlier run's file there would feed quantize the Hessians this refusal says do not exist
        Path(out).unlink(missing_ok=True)
    atomic_write_json(report_path, report)
    print(
        f"hessians: {len(hessians)} matrices from {report['calibration_tokens']:,} training tokens; {budget['message']}",
        file=sys.stderr,
    )
    return report, EXIT_OVER_BUDGET if refused else 0


def load_hessians(path: str | Path, checkpoint_weights_sha256: str | None = None) -> dict[str, Tensor]:
    """Read a hessians file (``torch.load(weights_only=True)``: no pickled code runs) and check its shape; given
    ``checkpoint_weights_sha256``, refuse a file collected from other weights. (A bare ``{name: matrix}`` file, as
    written before the file named its checkpoint, is read without that check.)"""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: hessians file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file; torch's own message suggests weights_only=False (runs code)
        raise HessianError(f"{path}: not a readable hessians file ({type(exc).__name__}: damaged, or holding objects "
                           "other than tensors, which are never unpickled)") from None
    if not isinstance(data, dict):
        raise HessianError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    if data.get("format") == HESSIANS_FORMAT:
        source = data.get("checkpoint_weights_sha256")
        if checkpoint_weights_sha256 is not None and source != checkpoint_weights_sha256:
            raise HessianError(f"{path}: collected from the checkpoint with weights sha256 {str(source)[:16]}..., not "
                               f"the one being quantized ({checkpoint_weights_sha256[:16]}...)")
        data = data.get("matrices")
        if not isinstance(data, dict):
            raise HessianError(f"{path}: 'matrices' is not a dict of tensors")
    for name, H in data.items():
        if not isinstance(name, str) or not isinstance(H, Tensor):
            raise HessianError(f"{path}: expected {{weight name: tensor}}, got an entry {name!r}: {type(H).__name__}")
        if H.ndim != 2 or H.shape[0] != H.shape[1] or H.dtype != torch.float32:
            raise HessianError(f"{path}: {name}: expected a square float32 matrix, got {H.dtype} {list(H.shape)}")
        if not bool(torch.isfinite(H).all()):
            raise HessianError(f"{path}: {name}: contains NaN or Inf (calibration forward overflowed?)")
        if bool((H.diagonal() < 0).any()):  # x^T x has a non-negative diagonal; GPTQ would take these columns as dead
            raise HessianError(f"{path}: {name}: has a negative diagonal entry; not a Hessian of the form x^T x")
    return data
