"""Typed, strict configuration: one frozen dataclass per pipeline stage.

A run is described by one YAML file (``config.yaml`` for the record, ``recipes/*.yaml`` for others). Every
section maps onto a frozen dataclass below; an unknown key, a wrong type or an out-of-range value is an error
that names the offending key (``config.yaml: data.val_docs: expected int, got str``). Nothing else in pgolf
reads YAML: stages receive their section as JSON on the command line (Snakemake passes it through
``params:``, so a changed knob reruns exactly the stages that own it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------------------------------------------
# Generic strict conversion from plain mappings to dataclasses
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {len(value)} items")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in a dataclass definition
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def from_mapping(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def to_dict(obj: Any) -> dict:
    """Plain-JSON view of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the documents or shards come from and how they are split and cut.

    ``source``:
      - ``docs``: download raw ``docs_selected.jsonl`` (+ its source manifest) from the Hub and tokenize here;
      - ``export``: download an already-tokenized export (shards + tokenizer + manifest) from the Hub;
      - ``local``: tokenize a local JSONL file of documents (``docs_path``), e.g. the bundled sample corpus.
    """

    name: str = "fineweb_sp8192_caseops"  # folder under results/data/
    source: Literal["docs", "export", "local"] = "docs"
    hub_repo: str = "willdepueoai/parameter-golf"
    revision: str = "main"  # branch, tag or commit sha; the resolved commit sha is recorded in the manifest
    docs_file: str = "datasets/docs_selected.jsonl"
    docs_manifest_file: str = "datasets/docs_selected.source_manifest.json"
    export_variant: str = "sp8192_lossless_caps_caseops_v1_reserved"  # datasets/datasets/fineweb10B_<variant>/
    docs_path: Optional[str] = None  # for source=local
    max_docs: int = 0  # 0: every document of the source; otherwise only the first max_docs (tests, sweeps)
    train_shards: int = 80  # export: how many train shards to download; docs/local: cap on train shards written
    val_docs: int = 50_000
    shard_tokens: int = 100_000_000
    workers: int = 0  # tokenization processes; 0 = all cores

    def __post_init__(self) -> None:
        _check(self.val_docs > 0, f"val_docs: expected > 0, got {self.val_docs}")
        _check(self.shard_tokens > 0, f"shard_tokens: expected > 0, got {self.shard_tokens}")
        _check(self.train_shards >= 0, f"train_shards: expected >= 0, got {self.train_shards}")
        _check(self.max_docs >= 0, f"max_docs: expected >= 0, got {self.max_docs}")
        _check(self.workers >= 0, f"workers: expected >= 0, got {self.workers}")
        _check(
            self.source != "local" or bool(self.docs_path),
            "docs_path: required when source is 'local'",
        )


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """The SentencePiece model: fetched from the Hub, read from a path, or trained on the documents.

    With ``caseops`` on, ids 4-7 must be the four CaseOps operators (checked on load).
    """

    source: Literal["hub", "path", "train", "export"] = "hub"
    hub_repo: str = "romeerp/parameter-golf-caseops-v1"
    revision: str = "main"
    filename: str = "datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    path: Optional[str] = None  # for source=path
    vocab_size: int = 8192
    caseops: bool = True
    train_docs: int = 0  # source=train: documents (from the training split) to train on; 0 = all of them
    train_max_sentence_chars: int = 16384

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 264, f"vocab_size: expected >= 264 (4 special + 4 operators + 256 bytes), got {self.vocab_size}")
        _check(self.vocab_size <= 65536, f"vocab_size: expected <= 65536 (uint16 shards), got {self.vocab_size}")
        _check(self.source != "path" or bool(self.path), "path: required when source is 'path'")
        _check(self.train_docs >= 0, f"train_docs: expected >= 0, got {self.train_docs}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture. Travels with the checkpoint and the packed artifact; later stages never re-read YAML.

    Defaults are the record (PR #1855): 35,945,671 parameters.
    """

    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0  # hidden = mlp_mult * model_dim
    mlp_activation: Literal["leaky_relu_sq", "relu_sq"] = "leaky_relu_sq"
    leaky_relu_slope: float = 0.5
    tie_embeddings: bool = True
    logit_softcap: float = 30.0  # 0 disables
    qk_norm: bool = True
    rope_dims: int = 16  # partial RoPE: first rope_dims of each head
    rope_base: float = 10000.0
    q_gain_init: float = 5.0  # learned per-head q gain; 0 disables
    xsa_last_n: int = 11  # XSA on the last n physical layers (num_layers = all, 0 = off)
    attn_gate: Literal["none", "sparse", "dense"] = "sparse"
    attn_gate_window: int = 12
    attn_gate_scale: float = 0.5
    smear_gate: bool = True
    smear_gate_window: int = 12
    smear_bos_mask: bool = True  # the cross-document fix; False reproduces the leaky pre-#1851 gate
    unet_skips: bool = True
    skip_gates: bool = True
    loop_start: int = 3  # first physical layer of the recurrent range (inclusive)
    loop_end: int = 5  # last physical layer of the recurrent range (inclusive)
    loop_count: int = 3  # passes over [loop_start, loop_end] once looping is on; 1 disables recurrence
    parallel_residual_start: int = 8  # first layer with two residual lanes; -1 disables
    embed_init_std: float = 0.005

    def __post_init__(self) -> None:
        _check(self.num_layers >= 1, f"num_layers: expected >= 1, got {self.num_layers}")
        _check(self.model_dim % self.num_heads == 0, f"model_dim: {self.model_dim} not divisible by num_heads {self.num_heads}")
        _check(
            self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
            f"num_kv_heads: expected a divisor of num_heads {self.num_heads}, got {self.num_kv_heads}",
        )
        head_dim = self.model_dim // self.num_heads
        _check(0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0, f"rope_dims: expected an even number in [0, {head_dim}], got {self.rope_dims}")
        _check(0 <= self.xsa_last_n <= self.num_layers, f"xsa_last_n: expected 0..{self.num_layers}, got {self.xsa_last_n}")
        _check(self.loop_count >= 1, f"loop_count: expected >= 1, got {self.loop_count}")
        if self.loop_count > 1:
            _check(
                0 <= self.loop_start <= self.loop_end < self.num_layers,
                f"loop_start/loop_end: expected 0 <= loop_start <= loop_end < num_layers={self.num_layers}, "
                f"got {self.loop_start}..{self.loop_end}",
            )
        _check(
            self.parallel_residual_start == -1 or 0 <= self.parallel_residual_start < self.num_layers,
            f"parallel_residual_start: expected -1 or 0..{self.num_layers - 1}, got {self.parallel_residual_start}",
        )
        _check(1 <= self.attn_gate_window <= self.model_dim, f"attn_gate_window: expected 1..{self.model_dim}, got {self.attn_gate_window}")
        _check(1 <= self.smear_gate_window <= self.model_dim, f"smear_gate_window: expected 1..{self.model_dim}, got {self.smear_gate_window}")
        _check(self.vocab_size >= 2, f"vocab_size: expected >= 2, got {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Muon for matrices, AdamW for the embedding and for scalars/gates (explicit parameter groups)."""

    matrix_lr: float = 0.026
    muon_momentum: float = 0.97
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_nesterov: bool = True
    muon_row_normalize: bool = True  # "MuonEq-R"
    ns_steps: int = 5
    ns_coefficients: Literal["polar_express", "fixed"] = "polar_express"
    muon_weight_decay: float = 0.095
    embed_lr: float = 0.03
    embed_weight_decay: float = 0.085
    scalar_lr: float = 0.02
    scalar_weight_decay: float = 0.02
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        _check(self.ns_steps >= 1, f"ns_steps: expected >= 1, got {self.ns_steps}")
        _check(
            self.ns_coefficients != "polar_express" or self.ns_steps <= 5,
            f"ns_steps: polar_express has 5 coefficient tuples, got ns_steps={self.ns_steps}",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Batch, schedule and budget of the training stage (the model and optimizer are their own sections)."""

    train_batch_tokens: int = 786_432  # global tokens per optimizer step, identical on 1 or N GPUs
    micro_batch_tokens: int = 98_304  # tokens per rank per forward (one packed varlen row)
    train_seq_len: int = 2048  # documents are cut into pieces of at most this many tokens
    max_wallclock_seconds: float = 600.0  # 0: step-based schedule over `iterations`
    hessian_reserve_seconds: float = 8.0  # taken off the cap so Hessians fit the training budget
    iterations: int = 20_000  # step cap (and schedule length when max_wallclock_seconds == 0)
    warmdown_fraction: float = 0.85  # LR multiplier 1 until 1 - warmdown_fraction, then linear decay
    min_lr_fraction: float = 0.10  # LR floor as a fraction of the peak
    compile_warmup_steps: int = 20  # steps whose state is thrown away (compile and autotune)
    grad_clip_norm: float = 0.3  # 0 disables
    ema_decay: float = 0.9965  # 0 disables
    loop_enable_fraction: float = 0.35  # training fraction after which depth recurrence turns on
    compile: bool = True
    fused_kernels: bool = True  # Triton MLP + softcapped CE (pgolf/kernels.py; passed `pytest -m gpu` on an H100)
    log_every_steps: int = 10
    # ILLEGAL (rules C3/C4, "pre-quant TTT" of PRs #1376/#1485/#1487): AdamW epochs on the VALIDATION tokens after
    # training, before GPTQ. It exists only so such a submission can be reproduced as a labelled sweep: a record
    # recipe refuses it, and the checkpoint records ``prequant_ttt_val_tokens`` so `pgolf comply` rejects the run.
    prequant_ttt_epochs: int = 0
    prequant_ttt_lr: float = 5e-4  # AdamW lr of that pass (PR #1487's value is not known; pgolf's choice)

    def __post_init__(self) -> None:
        _check(self.prequant_ttt_epochs >= 0, f"prequant_ttt_epochs: expected >= 0, got {self.prequant_ttt_epochs}")
        _check(self.prequant_ttt_lr > 0, f"prequant_ttt_lr: expected > 0, got {self.prequant_ttt_lr}")
        _check(self.train_seq_len >= 2, f"train_seq_len: expected >= 2, got {self.train_seq_len}")
        _check(self.micro_batch_tokens >= self.train_seq_len, "micro_batch_tokens: expected >= train_seq_len")
        _check(
            self.train_batch_tokens % self.micro_batch_tokens == 0,
            f"train_batch_tokens: expected a multiple of micro_batch_tokens={self.micro_batch_tokens}, got {self.train_batch_tokens}",
        )
        _check(self.max_wallclock_seconds >= 0, "max_wallclock_seconds: expected >= 0")
        _check(self.iterations >= 1, f"iterations: expected >= 1, got {self.iterations}")
        _check(0.0 <= self.warmdown_fraction <= 1.0, f"warmdown_fraction: expected 0..1, got {self.warmdown_fraction}")
        _check(0.0 <= self.min_lr_fraction <= 1.0, f"min_lr_fraction: expected 0..1, got {self.min_lr_fraction}")
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay: expected 0 <= d < 1, got {self.ema_decay}")
        _check(0.0 <= self.loop_enable_fraction <= 1.0, f"loop_enable_fraction: expected 0..1, got {self.loop_enable_fraction}")
        _check(self.compile_warmup_steps >= 0, "compile_warmup_steps: expected >= 0")
        _check(self.log_every_steps >= 1, "log_every_steps: expected >= 1")


@dataclasses.dataclass(frozen=True)
class HessianConfig:
    """Calibration for GPTQ: batches of TRAINING tokens (their read time counts toward the training budget)."""

    batches: int = 16
    batch_rows: int = 48  # sequences per batch
    seq_len: int = 2048

    def __post_init__(self) -> None:
        _check(self.batches >= 1, f"batches: expected >= 1, got {self.batches}")
        _check(self.batch_rows >= 1, f"batch_rows: expected >= 1, got {self.batch_rows}")
        _check(self.seq_len >= 2, f"seq_len: expected >= 2, got {self.seq_len}")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """GPTQ bit widths and SDClip sigmas per parameter role, and the LQER low-rank correction."""

    attn_bits: int = 6
    attn_clip_sigmas: float = 13.0
    mlp_bits: int = 6
    mlp_clip_sigmas: float = 11.5
    embed_bits: int = 7
    embed_clip_sigmas: float = 14.0
    gate_bits: int = 8  # attention gate, per-row int8
    passthrough_max_elements: int = 65_536  # smaller tensors stay fp16
    gptq_block_size: int = 128
    gptq_damp: float = 0.01  # times mean(diag H)
    act_order: bool = True
    lqer_mode: Literal["off", "asym", "sym"] = "asym"
    lqer_top_k: int = 3
    lqer_rank: int = 4
    lqer_group_size: int = 64

    def __post_init__(self) -> None:
        for name in ("attn_bits", "mlp_bits", "embed_bits", "gate_bits"):
            bits = getattr(self, name)
            _check(2 <= bits <= 8, f"{name}: expected 2..8, got {bits}")
        for name in ("attn_clip_sigmas", "mlp_clip_sigmas", "embed_clip_sigmas"):
            _check(getattr(self, name) > 0, f"{name}: expected > 0")
        _check(self.gptq_block_size >= 1, "gptq_block_size: expected >= 1")
        _check(self.gptq_damp >= 0, "gptq_damp: expected >= 0")
        _check(self.lqer_top_k >= 0 and self.lqer_rank >= 1, "lqer_top_k/lqer_rank: expected top_k >= 0, rank >= 1")
        _check(self.lqer_group_size >= 1, "lqer_group_size: expected >= 1")


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """Compression of the quantized model and the counted-code convention of the size gate."""

    compressor: Literal["brotli", "lzma", "lrzip"] = "brotli"
    brotli_quality: int = 11
    byte_shuffle: bool = False
    # store each 2-D integer code matrix column by column: a column's codes share one scale of the input feature,
    # so brotli's context model sees runs of similar magnitude (record-size model: 16.007 -> 15.867 MB of codes)
    column_major_codes: bool = True
    # how the int8 code matrices are coded: "rans" (pgolf/entropy.py: per-(matrix, column class) frequency tables
    # and rANS; record-size model ~67 KB below column-major brotli) or "compressor" (left to the compressor)
    codes_coder: Literal["rans", "compressor"] = "rans"
    rans_column_groups: int = 4  # column classes per matrix (2..6 measured within 2 KB of each other at record size)
    code_bytes_convention: Literal["wrapper", "file"] = "wrapper"
    size_cap_bytes: int = 16_000_000
    # hex characters kept of each tensor entry's sha256 in the artifact: 64 cost ~32 incompressible bytes per
    # entry (~6 KB for the record); 16 still catch any accidental corruption (the body sha256 is always full)
    sha256_hex_chars: int = 16

    def __post_init__(self) -> None:
        _check(0 <= self.brotli_quality <= 11, f"brotli_quality: expected 0..11, got {self.brotli_quality}")
        _check(self.size_cap_bytes > 0, "size_cap_bytes: expected > 0")
        _check(16 <= self.sha256_hex_chars <= 64, f"sha256_hex_chars: expected 16..64, got {self.sha256_hex_chars}")
        _check(1 <= self.rans_column_groups <= 255, f"rans_column_groups: expected 1..255, got {self.rans_column_groups}")


LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Score-first test-time training at evaluation (rules C1-C4: every token is scored before it feeds a gradient).

    ``mode``:
      - ``none``: plain scoring with within-document windows;
      - ``lora``: document-batched LoRA TTT (PR #1530 / record): documents longest first, ``docs_per_batch`` per
        batch, fresh per-document adapters, each document in chunks of ``chunk_tokens``: score the chunk, then one
        optimizer step on it (none after a document's last chunk). With ``phase_boundaries_docs``, a global SGD pass
        on the BASE weights over already-scored documents runs once that many documents are scored (phased TTT);
      - ``chunked``: the validation stream in chunks of ``stream_chunk_tokens`` (PR #549 / #1572 style): score a
        chunk, then ``chunk_epochs`` SGD steps on the whole model over it; the last chunk gets no update.

    ``optimizer`` ``sgd`` uses ``beta1`` as its momentum. ``debug_update_before_score`` is an ILLEGAL ordering
    (update, then score): it exists only so tests and compliance checks can show the ledger refuses it.
    """

    mode: Literal["none", "lora", "chunked"] = "lora"
    lora_rank: int = 80
    lora_alpha: float = 144.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    chunk_tokens: int = 48
    docs_per_batch: int = 64
    context_tokens: int = 2048
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.99
    weight_decay: float = 0.5
    warm_start_a: bool = True  # keep each slot's trained A from the previous batch (B is always reset to zero)
    # recompute block activations in LoRA backward: a 64 x 2048-token step needs > 80 GB eagerly without it, 59.5 GiB
    # compiled (the record turns it off: 17 % faster steps)
    checkpoint_activations: bool = True
    slot_lengths: tuple[int, ...] = ()  # LoRA slot lengths (one compiled graph each); () = 128, 256, ... context
    phase_boundaries_docs: tuple[int, ...] = (833, 1666, 2500)  # empty: no phases
    phase_scope: Literal["scored_prefix", "new_docs"] = "scored_prefix"  # what a phase trains on
    phase_lr: float = 0.001
    phase_momentum: float = 0.9
    phase_chunk_tokens: int = 32768
    # compile the phase passes too: off, because every phase row shape is its own whole-model forward+backward
    # graph (minutes of compile each on an H100; torch 2.11 inductor even failed on one) for passes that train
    # on a few million tokens in all, which eager mode does in seconds
    phase_compile: bool = False
    stream_chunk_tokens: int = 32768
    chunk_epochs: int = 1
    chunk_lr: float = 0.002
    chunk_momentum: float = 0.9
    # eval-time bigram hash embedding (PR #1523, pgolf/bigram_hash.py), chunked mode only: a table of this many
    # buckets x bigram_hash_dim (0 = model_dim) added to the token embedding, zero contribution at creation, trained
    # only by the score-first loop; not part of the artifact. 0 buckets = off.
    bigram_hash_buckets: int = 0
    bigram_hash_dim: int = 0
    debug_update_before_score: bool = False

    def __post_init__(self) -> None:
        _check(self.lora_rank >= 1, f"lora_rank: expected >= 1, got {self.lora_rank}")
        _check(self.lora_alpha > 0, f"lora_alpha: expected > 0, got {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        _check(not unknown, f"lora_targets: unknown target(s) {unknown}; allowed: {', '.join(LORA_TARGETS)}")
        _check(len(set(self.lora_targets)) == len(self.lora_targets), f"lora_targets: duplicates in {list(self.lora_targets)}")
        _check(self.mode != "lora" or len(self.lora_targets) >= 1, "lora_targets: expected at least one target in mode 'lora'")
        _check(self.chunk_tokens >= 1, f"chunk_tokens: expected >= 1, got {self.chunk_tokens}")
        _check(self.docs_per_batch >= 1, f"docs_per_batch: expected >= 1, got {self.docs_per_batch}")
        _check(
            self.context_tokens >= self.chunk_tokens,
            f"context_tokens: expected >= chunk_tokens ({self.chunk_tokens}), got {self.context_tokens}",
        )
        lengths = self.slot_lengths
        _check(
            not lengths or (all(n >= 1 for n in lengths) and all(a < b for a, b in zip(lengths, lengths[1:]))
                            and lengths[-1] >= self.context_tokens),
            f"slot_lengths: expected increasing lengths, the last >= context_tokens ({self.context_tokens}), got {list(lengths)}",
        )
        _check(self.lr > 0, f"lr: expected > 0, got {self.lr}")
        _check(0.0 <= self.beta1 < 1.0, f"beta1: expected 0 <= beta1 < 1, got {self.beta1}")
        _check(0.0 <= self.beta2 < 1.0, f"beta2: expected 0 <= beta2 < 1, got {self.beta2}")
        _check(self.weight_decay >= 0, f"weight_decay: expected >= 0, got {self.weight_decay}")
        bounds = self.phase_boundaries_docs
        _check(
            all(b >= 1 for b in bounds) and all(a < b for a, b in zip(bounds, bounds[1:])),
            f"phase_boundaries_docs: expected strictly increasing document counts >= 1, got {list(bounds)}",
        )
        _check(self.phase_lr >= 0, f"phase_lr: expected >= 0, got {self.phase_lr}")
        _check(0.0 <= self.phase_momentum < 1.0, f"phase_momentum: expected 0 <= m < 1, got {self.phase_momentum}")
        _check(self.phase_chunk_tokens >= 2, f"phase_chunk_tokens: expected >= 2, got {self.phase_chunk_tokens}")
        _check(self.stream_chunk_tokens >= 1, f"stream_chunk_tokens: expected >= 1, got {self.stream_chunk_tokens}")
        _check(self.chunk_epochs >= 0, f"chunk_epochs: expected >= 0, got {self.chunk_epochs}")
        _check(self.chunk_lr >= 0, f"chunk_lr: expected >= 0, got {self.chunk_lr}")
        _check(0.0 <= self.chunk_momentum < 1.0, f"chunk_momentum: expected 0 <= m < 1, got {self.chunk_momentum}")
        _check(self.bigram_hash_buckets >= 0, f"bigram_hash_buckets: expected >= 0 (0 = off), got {self.bigram_hash_buckets}")
        _check(self.bigram_hash_dim >= 0, f"bigram_hash_dim: expected >= 0 (0 = model_dim), got {self.bigram_hash_dim}")
        _check(
            self.bigram_hash_buckets == 0 or self.mode == "chunked",
            f"bigram_hash_buckets: the eval-time bigram hash is trained by chunked TTT; mode is {self.mode!r}",
        )


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation stage: exact bpb over the validation documents, diagnostics and test-time training.

    ``eval_seq_len``: attention windows inside a document (no window crosses a document). ``eval_batch_tokens``:
    tokens per packed row of the diagnostic (no-TTT) evaluations. Time budget: ``max_eval_seconds`` covers
    deserialization + compile warm-up (random tokens only) + scoring; a margin under ``warn_margin_seconds``
    warns. ``byte_accounting``: ``sidecar`` (CaseOps byte files), ``lut`` (tokenizer lookup table) or ``auto``
    (sidecar when present). ``max_docs`` > 0 scores only the first documents (sweeps; never a record).
    """

    eval_seq_len: int = 2048
    eval_batch_tokens: int = 65_536
    diagnostics: bool = True
    max_eval_seconds: float = 600.0
    warn_margin_seconds: float = 5.0
    compile: bool = True
    compile_warmup_steps: int = 2  # random-token calls per compiled shape
    byte_accounting: Literal["auto", "sidecar", "lut"] = "auto"
    max_docs: int = 0
    progress_every_seconds: float = 15.0
    ttt: TTTConfig = dataclasses.field(default_factory=TTTConfig)

    def __post_init__(self) -> None:
        _check(self.eval_seq_len >= 1, f"eval_seq_len: expected >= 1, got {self.eval_seq_len}")
        _check(
            self.eval_batch_tokens >= self.eval_seq_len,
            f"eval_batch_tokens: expected >= eval_seq_len ({self.eval_seq_len}), got {self.eval_batch_tokens}",
        )
        _check(self.max_eval_seconds > 0, f"max_eval_seconds: expected > 0, got {self.max_eval_seconds}")
        _check(self.warn_margin_seconds >= 0, f"warn_margin_seconds: expected >= 0, got {self.warn_margin_seconds}")
        _check(self.compile_warmup_steps >= 0, f"compile_warmup_steps: expected >= 0, got {self.compile_warmup_steps}")
        _check(self.max_docs >= 0, f"max_docs: expected >= 0 (0 = all), got {self.max_docs}")
        _check(self.progress_every_seconds > 0, f"progress_every_seconds: expected > 0, got {self.progress_every_seconds}")


_DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class AggregateConfig:
    """Multi-seed aggregation: the baseline to beat, the significance rules and the submission's metadata.

    The baseline is given either as its per-seed values (``baseline_seed_values``: a Welch t-test) or as a
    summary: ``baseline_mean`` and ``baseline_n``, plus ``baseline_std`` (sample std, ddof=1) when it is known.
    Leaderboard rows often publish only a mean; with ``baseline_std`` null the test is a one-sample t-test of the
    candidate seeds against that mean, i.e. the baseline is treated as exact (stated as such in the report).
    ``baseline_unit`` is the unit of those numbers, ``unit`` the unit the report states its test in. bpb and nats
    per token differ by one factor (the run's own validation bytes per token), so the t statistic and p-value do
    not depend on ``unit``; the README threshold is always ``readme_threshold_nats`` NATS PER TOKEN, converted to
    bpb with that same factor when ``unit`` is bpb. No baseline at all (sweeps) means no test and no record.
    """

    unit: Literal["nats_per_token", "bpb"] = "nats_per_token"
    baseline_name: str = ""  # e.g. the leaderboard row's PR, shown in the report
    baseline_seed_values: tuple[float, ...] = ()
    baseline_mean: Optional[float] = None
    baseline_std: Optional[float] = None  # sample std (ddof=1) of the baseline's seeds; null = unknown
    baseline_n: int = 0  # number of baseline seeds behind baseline_mean
    baseline_unit: Literal["bpb", "nats_per_token"] = "bpb"
    readme_threshold_nats: float = 0.005  # README: beat the record by at least this many nats per token ...
    readme_p: float = 0.01  # ... with p below this
    progression_p: float = 0.25  # the maintainers' cutoff in practice (#1902): one-sided Welch p below this
    allow_mixed_provenance: bool = False  # pool seeds whose code / data / config differ (listed in the report)
    author: str = ""
    github_id: str = ""
    submission_name: str = ""  # folder records/track_10min_16mb/<date>_<submission_name>; empty = the run name
    blurb: str = ""
    technique_summary: str = ""
    date: str = ""  # YYYY-MM-DD; empty = the day the report is written

    def __post_init__(self) -> None:
        has_values = len(self.baseline_seed_values) > 0
        has_summary = self.baseline_mean is not None
        _check(
            not (has_values and has_summary),
            "baseline_seed_values and baseline_mean: give one of them (per-seed values, or mean/std/n), not both",
        )
        if has_values:
            _check(
                len(self.baseline_seed_values) >= 2,
                f"baseline_seed_values: expected at least 2 values for a Welch test, got {len(self.baseline_seed_values)}",
            )
            _check(
                self.baseline_std is None and self.baseline_n == 0,
                "baseline_std/baseline_n: derived from baseline_seed_values; leave them unset",
            )
        else:
            _check(self.baseline_std is None or has_summary, "baseline_std: needs baseline_mean")
            if has_summary:
                _check(self.baseline_n >= 1, f"baseline_n: expected >= 1 with baseline_mean, got {self.baseline_n}")
            if self.baseline_std is not None:
                _check(self.baseline_std >= 0, f"baseline_std: expected >= 0, got {self.baseline_std}")
                _check(self.baseline_n >= 2, f"baseline_n: a known baseline_std needs >= 2 seeds, got {self.baseline_n}")
        _check(self.baseline_n >= 0, f"baseline_n: expected >= 0, got {self.baseline_n}")
        _check(self.readme_threshold_nats >= 0, f"readme_threshold_nats: expected >= 0, got {self.readme_threshold_nats}")
        for name in ("readme_p", "progression_p"):
            value = getattr(self, name)
            _check(0.0 < value < 1.0, f"{name}: expected 0 < p < 1, got {value}")
        _check(
            self.date == "" or bool(_DATE_PATTERN.match(self.date)),
            f"date: expected YYYY-MM-DD or empty (today), got {self.date!r}",
        )
        _check(
            self.submission_name == "" or bool(_NAME_PATTERN.match(self.submission_name)),
            f"submission_name: expected letters, digits, '_', '.', '-' (a folder name), got {self.submission_name!r}",
        )

    @property
    def has_baseline(self) -> bool:
        return len(self.baseline_seed_values) > 0 or self.baseline_mean is not None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole recipe: the run name, its seeds and one section per stage."""

    run: str
    mode: Literal["record", "sweep"] = "record"
    seeds: tuple[int, ...] = (42,)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    hessians: HessianConfig = dataclasses.field(default_factory=HessianConfig)
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeConfig)
    pack: PackConfig = dataclasses.field(default_factory=PackConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    aggregate: AggregateConfig = dataclasses.field(default_factory=AggregateConfig)

    def __post_init__(self) -> None:
        _check(bool(self.run) and "/" not in self.run, f"run: expected a non-empty name without '/', got {self.run!r}")
        _check(len(self.seeds) >= 1, "seeds: expected at least one seed")
        _check(len(set(self.seeds)) == len(self.seeds), f"seeds: duplicates in {list(self.seeds)}")
        if self.mode == "record":
            _check(
                self.data.val_docs == 50_000,
                f"data.val_docs: a record run must score the official 50,000 validation documents, got {self.data.val_docs}",
            )
            _check(
                self.train.prequant_ttt_epochs == 0,
                "train.prequant_ttt_epochs: training on validation tokens before scoring is illegal (C3/C4); a record "
                f"run must leave it 0, got {self.train.prequant_ttt_epochs} (run it as mode: sweep)",
            )
        _check(
            self.model.vocab_size == self.tokenizer.vocab_size,
            f"model.vocab_size ({self.model.vocab_size}) must equal tokenizer.vocab_size ({self.tokenizer.vocab_size})",
        )


def parse_run_config(data: Any, source: str = "config") -> RunConfig:
    """Validate a plain mapping (e.g. Snakemake's ``config``) into a RunConfig; errors start with ``source``."""
    try:
        return from_mapping(RunConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {str(exc).lstrip(': ')}") from None


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a recipe YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_run_config(data, str(path))


def section_from_json(cls: type, text: str, where: str) -> Any:
    """Parse one stage section passed as JSON on a stage's command line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    return from_mapping(cls, data, where)


# --------------------------------------------------------------------------------------------------------------
# JSON schema, generated from the dataclasses so the two can never drift apart
# --------------------------------------------------------------------------------------------------------------


def _schema_for(tp: Any) -> dict:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema_for(a) for a in typing.get_args(tp)]}
    if tp is type(None):
        return {"type": "null"}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema_for(args[0])}
        return {"type": "array", "prefixItems": [_schema_for(a) for a in args], "minItems": len(args), "maxItems": len(args)}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props = {}
        required = []
        for f in dataclasses.fields(tp):
            props[f.name] = _schema_for(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        out = {"type": "object", "additionalProperties": False, "properties": props}
        if required:
            out["required"] = required
        return out
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}}[tp]


def json_schema() -> dict:
    """The JSON schema of a recipe file (written to workflow/schemas/config.schema.yaml)."""
    schema = _schema_for(RunConfig)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "pgolf recipe", **schema}
