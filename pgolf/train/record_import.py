"""``pgolf checkpoint import-record``: a state dict saved by PR #1855's ``train_gpt.py`` as a pgolf checkpoint.

The record saves ``torch.save(model.state_dict())`` (``final_model.pt`` after its EMA; an initial state the same
way): the block matrices live in four banks, the token embedding is bf16 (its ``param_storage: record``) and
everything else float32. The import writes what pgolf's training stage writes (``pgolf.train.checkpoint``:
``model.pt`` + ``checkpoint.json`` with the ModelConfig), so the Hessian, quantize, pack and evaluate stages, and
``pgolf train --init-checkpoint``, run on the record's weights.

Names (L layers; no transposes: both sides hold [out_features, in_features]):

=================================  ====================================================
record                             pgolf
=================================  ====================================================
``qo_bank`` [2L, d, d]             ``blocks.i.attn.q.weight`` = [i], ``blocks.i.attn.o.weight`` = [L + i]
``kv_bank`` [2L, kv, d]            ``blocks.i.attn.k.weight`` = [i], ``blocks.i.attn.v.weight`` = [L + i]
``mlp_up_bank``, ``mlp_down_bank``  ``blocks.i.mlp.up.weight``, ``blocks.i.mlp.down.weight`` = [i]
``blocks.i.attn.attn_gate_w``      ``blocks.i.attn.gate.weight`` (sparse [H, window] or dense [H, d])
``smear_gate.weight``, ``smear_lambda``  ``smear.gate.weight``, ``smear.lam``
``parallel_post_lambdas`` [L,2,2]   ``lane_post_lambdas`` (dropped without lanes: the record always allocates them)
``parallel_resid_lambdas`` [L, 2]   ``lane_resid_lambdas`` (both indexed by lane)
anything else                      the same name (embedding, head, q gains, scales, resid_mix, skip weights/gates)
=================================  ====================================================

The architecture: the weights' shapes cannot tell RoPE dims, XSA layers, the loop range or the first two-lane
layer, so they come from the record run's log (the ``Hyperparameters:`` block its main() prints, ``--log``) or,
stated in the metadata, from a recipe's ``model:`` section (``--config``). Either way the result is checked against
every shape (bank sizes, heads, gates, SmearGate window, skip slots = the loop settings); a disagreement, or a
record option pgolf has no equivalent for, is refused.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

import torch

from pgolf.config import ModelConfig, to_dict

KINDS = {"final": "record_final", "initial": "record_initial"}
_RENAME = {"smear_gate.weight": "smear.gate.weight", "smear_lambda": "smear.lam",
           "parallel_post_lambdas": "lane_post_lambdas", "parallel_resid_lambdas": "lane_resid_lambdas"}


class RecordImportError(ValueError):
    """The state dict or its hyperparameters cannot become a pgolf checkpoint; the message says why."""


def parse_hparams_log(path: str | Path) -> dict[str, str]:
    """The ``Hyperparameters:`` block of a record log: ``{name: value as printed}``."""
    values: dict[str, str] = {}
    inside = False
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not inside:
            inside = line.strip() == "Hyperparameters:"
            continue
        match = re.match(r"^  ([a-z_0-9]+): ?(.*)$", line)
        if not match:
            break
        values[match.group(1)] = match.group(2)
    if not values:
        raise RecordImportError(f"{path}: no 'Hyperparameters:' block (the record script prints one at the start of its log)")
    return values


def _get(hp: dict[str, str], name: str, kind, where: str):
    if name not in hp:
        raise RecordImportError(f"{where}: no {name!r} in the Hyperparameters block")
    text = hp[name]
    if kind is bool:
        if text not in ("True", "False", "1", "0"):
            raise RecordImportError(f"{where}: {name}: expected True or False, got {text!r}")
        return text in ("True", "1")
    try:
        return kind(text)
    except ValueError:
        raise RecordImportError(f"{where}: {name}: expected {kind.__name__}, got {text!r}") from None


def config_from_hparams(hp: dict[str, str], where: str = "log") -> ModelConfig:
    """The ModelConfig that computes what the record's ``GPT(h)`` computes for these hyperparameters."""
    def get(name, kind=int):
        return _get(hp, name, kind, where)

    refused = [(get("attn_out_gate_enabled", bool), "attn_out_gate_enabled: True"),
               (not get("ln_scale", bool), "ln_scale: False"), (get("rope_yarn", bool), "rope_yarn: True"),
               (hp.get("parallel_final_lane", "mean").lower() != "mean", f"parallel_final_lane: {hp.get('parallel_final_lane')}"),
               (get("qk_gain_init", float) <= 0, "qk_gain_init <= 0"),
               (get("sparse_attn_gate_enabled", bool) and get("gated_attn_enabled", bool), "both attention gates")]
    for bad, what in refused:
        if bad:
            raise RecordImportError(f"{where}: {what} has no pgolf equivalent")
    layers, heads, dim = get("num_layers"), get("num_heads"), get("model_dim")
    sparse, dense = get("sparse_attn_gate_enabled", bool), get("gated_attn_enabled", bool)
    loops, lanes, rope = get("num_loops"), get("parallel_start_layer"), get("rope_dims")
    try:
        return ModelConfig(
            vocab_size=get("vocab_size"), num_layers=layers, model_dim=dim, num_heads=heads,
            num_kv_heads=get("num_kv_heads"), mlp_mult=get("mlp_mult", float), mlp_activation="leaky_relu_sq",
            leaky_relu_slope=0.5, tie_embeddings=get("tie_embeddings", bool), logit_softcap=get("logit_softcap", float),
            qk_norm=True, rope_dims=rope if rope > 0 else dim // heads, rope_base=get("rope_base", float),
            rope_positions="row", q_gain_init=get("qk_gain_init", float), xsa_last_n=min(max(get("xsa_last_n"), 0), layers),
            attn_gate="sparse" if sparse else ("dense" if dense else "none"), attn_gate_window=get("gate_window"),
            attn_gate_scale=get("sparse_attn_gate_scale", float) if sparse else 1.0,  # the dense gate has no scale
            smear_gate=get("smear_gate_enabled", bool), smear_gate_window=get("gate_window"), smear_bos_mask=True,
            unet_skips=True, skip_gates=get("skip_gates_enabled", bool),
            loop_start=get("loop_start") if loops > 0 else 0, loop_end=get("loop_end") if loops > 0 else 0,
            loop_count=loops + 1 if loops > 0 else 1, parallel_residual_start=lanes if lanes > 0 else -1,
            embed_init_std=get("tied_embed_init_std", float),
        )
    except ValueError as exc:
        raise RecordImportError(f"{where}: no valid pgolf ModelConfig: {exc}") from None


def state_from_record(sd: dict[str, torch.Tensor], num_layers: int, lanes: bool) -> dict[str, torch.Tensor]:
    """Record names -> pgolf names (module docstring), every tensor float32 (bf16 -> float32 is exact)."""
    n = num_layers
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        t = t.detach().to("cpu", torch.float32)
        if key in ("qo_bank", "kv_bank"):
            first, second = ("q", "o") if key == "qo_bank" else ("k", "v")
            for i in range(n):
                out[f"blocks.{i}.attn.{first}.weight"], out[f"blocks.{i}.attn.{second}.weight"] = t[i], t[n + i]
        elif key in ("mlp_up_bank", "mlp_down_bank"):
            for i in range(n):
                out[f"blocks.{i}.mlp.{key[4:-5]}.weight"] = t[i]
        elif key.endswith(".attn.attn_gate_w"):
            out[key[: -len("attn_gate_w")] + "gate.weight"] = t
        elif key.startswith("parallel_") and not lanes:
            continue
        else:
            out[_RENAME.get(key, key)] = t
    return {k: v.clone().contiguous() for k, v in out.items()}


def check_against_weights(cfg: ModelConfig, sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Map ``sd`` for ``cfg`` and check every name and shape against pgolf's GPT(cfg); returns the pgolf state."""
    from pgolf.model.gpt import build_meta

    for key in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank", "tok_emb.weight"):
        if key not in sd:
            raise RecordImportError(f"{where}: no {key!r}: not a state dict of PR #1855's train_gpt.py")
    for key, dims in (("tok_emb.weight", 2), ("qo_bank", 3), ("kv_bank", 3), ("mlp_up_bank", 3), ("mlp_down_bank", 3)):
        if sd[key].dim() != dims:
            raise RecordImportError(f"{where}: {key!r} has shape {list(sd[key].shape)}, expected {dims} dimensions "
                                    "(PR #1855's train_gpt.py)")
    vocab, dim = sd["tok_emb.weight"].shape
    layers, hidden = sd["mlp_up_bank"].shape[:2]
    heads = sd["blocks.0.attn.q_gain"].numel() if "blocks.0.attn.q_gain" in sd else None
    gate = sd.get("blocks.0.attn.attn_gate_w")
    facts = {  # ModelConfig field: (what the weights say, what the config says)
        "vocab_size": (vocab, cfg.vocab_size), "model_dim": (dim, cfg.model_dim), "num_layers": (layers, cfg.num_layers),
        "num_heads": (heads, cfg.num_heads), "mlp_mult": (hidden, cfg.mlp_hidden),
        "num_kv_heads": (sd["kv_bank"].shape[1], cfg.num_kv_heads * cfg.head_dim),
        "tie_embeddings": ("lm_head.weight" not in sd, cfg.tie_embeddings),
        "smear_gate": ("smear_gate.weight" in sd, cfg.smear_gate), "skip_gates": ("skip_gates" in sd, cfg.skip_gates),
        "attn_gate": (gate is not None, cfg.attn_gate != "none"),
    }
    wrong = [f"{name} (weights: {have}, config: {want})" for name, (have, want) in facts.items() if have != want]
    if wrong:
        raise RecordImportError(f"{where}: the weights do not fit the model config: {', '.join(wrong)} "
                                "(mlp_mult and num_kv_heads compared as MLP width and K/V rows)")
    state = state_from_record(sd, layers, cfg.parallel_residual_start >= 0)
    expected = {k: tuple(v.shape) for k, v in build_meta(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if "skip_weights" in got and got["skip_weights"] != expected.get("skip_weights"):
        raise RecordImportError(f"{where}: skip_weights has {got['skip_weights'][0]} U-Net slots, the config's loop "
                                f"settings give {expected.get('skip_weights', (0,))[0]}: wrong loop_start/loop_end/loop_count")
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shapes = sorted(f"{k} {got[k]} (config: {expected[k]})" for k in set(expected) & set(got) if expected[k] != got[k])
        raise RecordImportError(f"{where}: the weights do not fit the model config: missing {missing[:4]}, "
                                f"unexpected {extra[:4]}, shapes {shapes[:4]}")
    return state


def _log_facts(log: Path) -> dict:
    """What the log says about the run besides the hyperparameters (training time and steps)."""
    found = re.search(r"stopping_early: \S+ train_time: (\d+)ms step: (\d+)", log.read_text(encoding="utf-8", errors="replace"))
    return {"train_seconds": int(found.group(1)) / 1000.0, "steps": int(found.group(2))} if found else {}


def import_record(state_pt: str | Path, out_dir: str | Path, *, log: str | Path | None = None,
                  recipe_model: Optional[ModelConfig] = None, recipe_path: str | None = None, kind: str = "final",
                  force: bool = False) -> Path:
    """Write the pgolf checkpoint of a record state dict into ``out_dir``; returns its ``checkpoint.json``.

    The architecture comes from ``log`` (the record run's log) or, when there is none, ``recipe_model`` (a
    recipe's model section, named by ``recipe_path`` in the metadata). ``kind``: ``final`` (``final_model.pt``)
    or ``initial`` (the state the record trains from, for ``pgolf train --init-checkpoint``)."""
    from pgolf.compliance.provenance import code_hash, environment
    from pgolf.train.checkpoint import META_NAME, save_checkpoint

    if kind not in KINDS:
        raise RecordImportError(f"--kind: expected one of {sorted(KINDS)}, got {kind!r}")
    if (log is None) == (recipe_model is None):
        raise RecordImportError("give the record run's log (--log) or a recipe (--config), exactly one: the weights' shapes "
                                "cannot tell RoPE dims, XSA layers, the loop range or the first two-lane layer")
    state_pt, out_dir = Path(state_pt), Path(out_dir)
    if (out_dir / META_NAME).exists() and not force:
        raise RecordImportError(f"{out_dir}: already holds a checkpoint (pass --force to replace it)")
    try:
        sd = torch.load(state_pt, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RecordImportError(f"{state_pt}: not found") from None
    except IsADirectoryError:
        raise RecordImportError(f"{state_pt}: a folder, expected the record script's final_model.pt") from None
    except Exception as exc:  # a foreign file; torch's own message suggests weights_only=False, which runs pickled code
        raise RecordImportError(f"{state_pt}: not a readable state dict ({type(exc).__name__}); expected the record "
                                "script's final_model.pt") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RecordImportError(f"{state_pt}: expected a state dict (name -> tensor)")
    hp = parse_hparams_log(log) if log is not None else None
    cfg = config_from_hparams(hp, str(log)) if hp is not None else recipe_model
    state = check_against_weights(cfg, sd, str(state_pt))
    storage = "record" if sd["tok_emb.weight"].dtype == torch.bfloat16 else "fp32"
    meta = {
        "model_config": to_dict(cfg),
        "weights": KINDS[kind],
        "param_storage": storage,  # bf16 embedding = the record's storage (its values are bf16, held in float32 here)
        "prequant_ttt_val_tokens": 0,  # the record trains on training shards only
        "source": {
            "format": "PR #1855 train_gpt.py state_dict (banked)",
            "path": str(state_pt),
            "sha256": hashlib.sha256(state_pt.read_bytes()).hexdigest(),
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items()},
            "model_config_from": f"log {log}" if log is not None else f"recipe {recipe_path or '(given)'} (not in the weights: "
                                 "rope_dims, rope_base, xsa_last_n, logit_softcap, loop range, first two-lane layer)",
            "record_hparams": hp,
        },
        **(_log_facts(Path(log)) if log is not None else {}),
        "code_hash": code_hash(),
        "environment": environment(),
    }
    return save_checkpoint(out_dir, state, meta)
