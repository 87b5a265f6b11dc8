"""The training checkpoint: weights + a self-describing metadata file, written atomically.

Layout of a checkpoint directory:
  model.pt         {parameter name: tensor} saved with torch.save; loaded with ``weights_only=True`` only,
                   so loading never executes pickled code.
  checkpoint.json  format, version, the model config (the architecture travels with the weights), training
                   and optimizer configs, steps, tokens seen, data manifest hash, code hash, and the sha256 of
                   model.pt. Written last: its presence marks a complete checkpoint.

Both files are a function of the inputs: the same weights give the same bytes (``model.pt`` is serialized in
memory, so its zip records never carry a temporary file's name), and the measured times
and the machine live in ``train_summary.json`` (pgolf.io.TIMING_FIELDS), never here.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import torch

from pgolf.config import ModelConfig, from_mapping
from pgolf.io import atomic_write_bytes, atomic_write_json, read_json_object, sha256_file

CHECKPOINT_FORMAT = "pgolf-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_NAME = "model.pt"
META_NAME = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupted, of another format or does not match its model config."""


def save_checkpoint(out_dir: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write weights then metadata (both atomically); returns the metadata path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_NAME
    if meta_path.exists():
        meta_path.unlink()  # an old metadata file must never describe new weights
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    # through memory: torch.save to a path names the zip's records after that (temporary, random) file name
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    atomic_write_bytes(out_dir / WEIGHTS_NAME, buffer.getvalue())
    full_meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **meta,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha256_file(out_dir / WEIGHTS_NAME),
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in tensors.items()},
    }
    atomic_write_json(meta_path, full_meta)
    return meta_path


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META_NAME
    if not meta_path.exists():
        raise CheckpointError(f"{ckpt_dir}: no {META_NAME} (incomplete or not a pgolf checkpoint)")
    try:
        meta = read_json_object(meta_path, "checkpoint metadata")
    except ValueError as exc:  # not JSON, or JSON that is not an object
        raise CheckpointError(str(exc)) from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(f"{meta_path}: version {version!r}, expected an integer from 1 to {CHECKPOINT_VERSION} "
                              "(a newer one needs a newer pgolf)")
    for key, kind in (("weights_file", str), ("weights_sha256", str), ("tensors", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{meta_path}: key {key!r} expected {kind.__name__}, got {meta.get(key)!r:.80}")
    return meta


def load_checkpoint(ckpt_dir: str | Path, verify_hash: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (state_dict, metadata) without executing pickled code; checks hash and tensor table."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_checkpoint_meta(ckpt_dir)
    weights = ckpt_dir / meta["weights_file"]
    if not weights.exists():
        raise CheckpointError(f"{weights}: weights file missing")
    if verify_hash:
        actual = sha256_file(weights)
        if actual != meta["weights_sha256"]:
            raise CheckpointError(f"{weights}: sha256 {actual[:16]}... does not match checkpoint.json ({meta['weights_sha256'][:16]}...)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file (unverified: verify_hash off); the error type varies
        raise CheckpointError(f"{weights}: not a readable weights file ({type(exc).__name__})") from None
    expected = meta["tensors"]
    if set(state) != set(expected):
        raise CheckpointError(f"{weights}: tensor names differ from checkpoint.json: {sorted(set(state) ^ set(expected))[:5]}")
    for name, t in state.items():
        entry = expected[name] if isinstance(expected[name], dict) else {}
        stored = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for field, value in stored.items():
            if entry.get(field) != value:
                raise CheckpointError(f"{weights}: {name} has {field} {value}, checkpoint.json says {entry.get(field)}")
    return state, meta


def model_config_of(meta: dict[str, Any], where: str = "checkpoint.json") -> ModelConfig:
    """The architecture recorded with the weights (later stages never re-read it from YAML)."""
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{where}: no model_config object (got {meta.get('model_config')!r:.80}): the weights "
                              "cannot be given an architecture")
    return from_mapping(ModelConfig, meta["model_config"], f"{where}: model_config")


def load_initial_weights(model: torch.nn.Module, model_cfg: ModelConfig, ckpt_dir: str | Path) -> dict[str, Any]:
    """Load a checkpoint's weights into a freshly built ``model`` (``pgolf train --init-checkpoint``), e.g. the
    record script's own initial weights imported by ``pgolf checkpoint import-record``, so that both runs start
    from the same point. The checkpoint's architecture must be ``model_cfg``; returns its metadata."""
    state, meta = load_checkpoint(ckpt_dir)
    ckpt_cfg = model_config_of(meta, f"{ckpt_dir}/{META_NAME}")
    if ckpt_cfg != model_cfg:
        differ = [f.name for f in dataclasses.fields(ModelConfig) if getattr(ckpt_cfg, f.name) != getattr(model_cfg, f.name)]
        raise CheckpointError(
            f"{ckpt_dir}/{META_NAME}: model_config differs from the recipe's model section in {', '.join(differ)}"
        )
    model.load_state_dict(state, strict=True)  # copies (and converts) into the model's own tensors
    return meta
