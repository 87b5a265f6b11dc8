"""Resuming an interrupted sweep from its last periodic state (``train.resume_every_steps``), and the record of
interrupted attempts.

Every ``resume_every_steps`` steps rank 0 saves the whole training state under ``<train dir>/resume/``, a folder
no Snakemake rule declares (Snakemake deletes a job's declared outputs before it runs the job again, never this):

- ``state-<step>.pt``: model, every optimizer's state (Muon's momentum in its own dtype, AdamW's moments and step
  counts), the EMA shadow, the step, the loop state, the schedule clock (loop seconds so far), the RNG states and
  the step times; written through memory, then atomically, beside the previous step's file;
- ``state.json``, written last: the fingerprint, the step, the state file's name and sha256 and the metrics lines
  written so far (the resumed ``metrics.jsonl`` continues from them). Only then is the previous state file
  removed, so a process killed between the two writes still leaves the previous state to resume from.

The data stream needs nothing: both loaders read micro-batch (step, accumulation index) by random access.
A state is resumed only when its fingerprint (every knob that changes the numbers, the seed, the world size, the
data manifest, the initial weights and the pgolf code) matches; otherwise the run starts over and says why.
A resumed run ends with the same weights, bit for bit, as an uninterrupted one (tests/test_resume.py).

A record run is one uninterrupted timed run: record mode refuses ``resume_every_steps > 0`` and an interrupted
record run starts over from step 0, saying so (the loop's ``attempt.json`` in the same folder counts the attempts;
``train_summary.json`` carries ``earlier_attempts``). After a successful finish the folder is removed, so a forced
rerun trains afresh. The loop imports this module only when ``resume_every_steps > 0``, so a bundle of a recipe
that never saves a state can leave it out.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from pgolf.config import ModelConfig, OptimConfig, TrainConfig, to_dict
from pgolf.io import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file, sha256_json

STATE_PATTERN = "state-{step:08d}.pt"  # one file per saved step; state.json names the current one
META_NAME = "state.json"
STATE_FORMAT = "pgolf-train-state"
STATE_VERSION = 1
NEUTRAL_TRAIN_KEYS = ("resume_every_steps", "log_every_steps")  # when to save or print, never the numbers


def fingerprint(model_cfg: ModelConfig, optim_cfg: OptimConfig, train_cfg: TrainConfig, seed: int,
                world_size: int, data_info: Mapping[str, Any], code: str) -> str:
    """What must match for a saved state to be continued."""
    train = to_dict(train_cfg)
    for key in NEUTRAL_TRAIN_KEYS:
        train.pop(key, None)
    return sha256_json({
        "format": STATE_FORMAT, "version": STATE_VERSION, "model": to_dict(model_cfg), "optim": to_dict(optim_cfg),
        "train": train, "seed": seed, "world_size": world_size,
        "data_manifest_sha256": data_info.get("data_manifest_sha256"),
        "init_weights_sha256": data_info.get("init_weights_sha256"), "code_hash": code,
    })


def _cpu(obj: Any) -> Any:
    """A copy of nested containers with every tensor detached on the CPU (dtype kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def capture(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], ema_shadow: Mapping[str, torch.Tensor],
            **loop_state: Any) -> dict[str, Any]:
    """The whole training state as plain containers of CPU tensors (``loop_state``: step, looping, ...)."""
    state = {
        "model": _cpu(model.state_dict()),
        "optimizers": [_cpu(opt.state_dict()) for opt in optimizers],
        "ema": _cpu(dict(ema_shadow)),
        "torch_rng": torch.get_rng_state(),
        **loop_state,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def save(resume_dir: Path, state: dict[str, Any], fingerprint_hex: str, step: int, metrics_lines: list[str]) -> None:
    """``state-<step>.pt`` then ``state.json`` (both atomic), then the older state files go: a ``state.json``
    always names a complete state file, and a crash between the writes keeps the previous pair."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    name = STATE_PATTERN.format(step=step)
    atomic_write_bytes(resume_dir / name, data)
    atomic_write_json(resume_dir / META_NAME, {
        "format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": fingerprint_hex, "step": step,
        "state_file": name, "state_sha256": sha256_bytes(data), "metrics": metrics_lines,
    })
    for old in resume_dir.glob("state-*.pt"):
        if old.name != name:
            old.unlink()


def load(resume_dir: Path, fingerprint_hex: str) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]], str]:
    """(state, state.json, why): the saved state when its fingerprint and hash match, else (None, None, reason)."""
    meta_path = resume_dir / META_NAME
    if not meta_path.exists():
        return None, None, "no saved state"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        return None, None, f"{meta_path} is not valid JSON: starting over"
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return None, None, f"{meta_path}: not a saved state's description (no object with a step): starting over"
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        return None, None, f"{meta_path}: another format or version: starting over"
    if meta.get("fingerprint") != fingerprint_hex:
        return None, None, (f"{meta_path}: saved by another configuration, seed, GPU count, data or pgolf code: "
                            "starting over")
    state_path = resume_dir / str(meta.get("state_file", ""))
    if not state_path.is_file() or sha256_file(state_path) != meta.get("state_sha256"):
        return None, None, f"{state_path}: missing or not the file {meta_path} describes: starting over"
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    return state, meta, f"resuming from step {meta['step']}"


def load_optimizer(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``opt.load_state_dict(saved)``, keeping each saved state tensor's dtype: torch casts floating state to the
    parameter's dtype, which would turn a bf16 Muon momentum (``record_bf16``) into fp32 and change the next step."""
    opt.load_state_dict(saved)
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, entries in saved["state"].items():
        p = params[int(index)]
        for key, value in entries.items():
            live = opt.state[p].get(key)
            if isinstance(value, torch.Tensor) and isinstance(live, torch.Tensor) and live.dtype != value.dtype:
                opt.state[p][key] = value.to(device=live.device)


def restore(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], ema_shadow: dict[str, torch.Tensor],
            state: dict[str, Any]) -> None:
    """Load a captured state back into the live objects (in place: the EMA keeps its references)."""
    with torch.no_grad():
        model.load_state_dict(state["model"])
        for name, tensor in state["ema"].items():
            ema_shadow[name].copy_(tensor)
    if len(optimizers) != len(state["optimizers"]):
        raise ValueError(f"saved state has {len(state['optimizers'])} optimizers, the run has {len(optimizers)}")
    for opt, saved in zip(optimizers, state["optimizers"]):
        load_optimizer(opt, saved)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
