"""The configuration sections of the stages after training: Hessians, quantization, packing, evaluation and
aggregation."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal, Optional

from pgolf.config.strict import FOLDER_NAME, check, folder_name_error


@dataclasses.dataclass(frozen=True)
class HessianConfig:
    """Calibration for GPTQ: batches of TRAINING tokens (their read time counts toward the training budget)."""

    batches: int = 16
    batch_rows: int = 48  # sequences per batch
    seq_len: int = 2048
    # H = sum(x^T x) / n: "rows" (pgolf's): n = rows the hook saw (tokens x applications of the layer);
    # "batches" (the record's): n = calibration batches
    normalize: Literal["rows", "batches"] = "rows"
    # which rows: "uniform" (pgolf's): seeded offsets over the whole training stream; "record": the record's
    # shuffled-sequence sampler of rank sampler_rank of sampler_world_size (its own seed, not the run's)
    sampler: Literal["uniform", "record"] = "uniform"
    sampler_world_size: int = 8
    sampler_rank: int = 0
    # attention span of a calibration row: "documents" (pgolf's, as in training: BOS starts a segment, positions
    # restart there) or "rows" (the record's: causal over the whole row, across documents)
    attention: Literal["documents", "rows"] = "documents"
    # "autocast" (pgolf's: fp32 weights under bf16 autocast on CUDA) or "bfloat16" (the record's: a bf16 copy of
    # the model, no autocast, so the residual stream is bf16 too)
    forward_dtype: Literal["autocast", "bfloat16"] = "autocast"
    # torch's intra-op CPU threads for this stage (on the CPU) (the stage sets it itself, on every entry point): CPU float sums
    # depend on the thread count, so a stage whose CPU numbers must be the same from the staged pipeline and from
    # train_gpt.py sets a number here. 0 (pgolf's default): leave torch's default (OMP_NUM_THREADS or the core
    # count), which differs between Snakemake jobs, torchrun and a plain run.
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        check(self.cpu_threads >= 0, f"cpu_threads: expected >= 0 (0 = torch's default), got {self.cpu_threads}")
        check(self.batches >= 1, f"batches: expected >= 1, got {self.batches}")
        check(self.batch_rows >= 1, f"batch_rows: expected >= 1, got {self.batch_rows}")
        check(self.seq_len >= 2, f"seq_len: expected >= 2, got {self.seq_len}")
        check(self.sampler_world_size >= 1, f"sampler_world_size: expected >= 1, got {self.sampler_world_size}")
        check(
            0 <= self.sampler_rank < self.sampler_world_size,
            f"sampler_rank: expected 0 <= rank < sampler_world_size ({self.sampler_world_size}), got {self.sampler_rank}",
        )


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
    # the attention gate is int8 only with gate_min_elements <= numel <= gate_max_elements (null: no upper
    # limit; pgolf's: 1 and null); outside it the size rule below applies (the record's window: 32..8192)
    gate_min_elements: int = 1
    gate_max_elements: Optional[int] = None
    passthrough_max_elements: int = 65_536  # smaller tensors stay fp16
    # true (the record's): the size rule comes first for every tensor, so attention/MLP/embedding matrices of
    # <= passthrough_max_elements stay fp16; false (pgolf's): those roles are always GPTQ-quantized
    small_matrix_passthrough: bool = False
    gptq_block_size: int = 128
    gptq_damp: float = 0.01  # times mean(diag H)
    act_order: bool = True
    # SDClip's row std: "unbiased" (the record's, divides by cols - 1) or "population" (pgolf's earlier, by cols)
    sdclip_std: Literal["unbiased", "population"] = "unbiased"
    # input features that never fire (diag H == 0): "keep" (pgolf's: their weights rounded to nearest, which a
    # tied embedding needs on its input side) or "zero" (the record's: their codes are 0)
    gptq_dead_columns: Literal["keep", "zero"] = "keep"
    # "asym" = the record's codebook (float32 SVD; A int2 [-2, 1] with one scale max|A| / 1.5; B int4 [-8, 7] per
    # group of 64 with scale max / 7.5; per-row int4 "rowsym" factors when rank * cols is not a multiple of the
    # group); "asym_search" = pgolf's (float64 SVD, signs flipped, A scale grid-searched, B [-7, 7]);
    # "sym" = int4 [-7, 7] groups along A^T and B
    lqer_mode: Literal["off", "asym", "asym_search", "sym"] = "asym_search"
    lqer_top_k: int = 3
    lqer_rank: int = 4
    lqer_group_size: int = 64
    # which tensors get LQER: "output_error" (pgolf's: largest trace(D H D^T)) or "weight_fro" (the record's:
    # largest ||W - W_hat||_F); keep_if_better true (pgolf's) keeps a correction only if it lowers the output error
    lqer_rank_by: Literal["output_error", "weight_fro"] = "output_error"
    lqer_keep_if_better: bool = True
    # dtype the dequantized embedding is rounded through: "float32" (pgolf's: no rounding) or "bfloat16" (the
    # record's: its evaluation model holds tok_emb in bf16)
    dequant_embed_dtype: Literal["float32", "bfloat16"] = "float32"
    # torch's intra-op CPU threads for GPTQ (on the CPU by default) (the stage sets it itself, on every entry point): CPU float sums
    # depend on the thread count, so a stage whose CPU numbers must be the same from the staged pipeline and from
    # train_gpt.py sets a number here. 0 (pgolf's default): leave torch's default (OMP_NUM_THREADS or the core
    # count), which differs between Snakemake jobs, torchrun and a plain run.
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        check(self.cpu_threads >= 0, f"cpu_threads: expected >= 0 (0 = torch's default), got {self.cpu_threads}")
        for name in ("attn_bits", "mlp_bits", "embed_bits", "gate_bits"):
            bits = getattr(self, name)
            check(2 <= bits <= 8, f"{name}: expected 2..8, got {bits}")
        for name in ("attn_clip_sigmas", "mlp_clip_sigmas", "embed_clip_sigmas"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, f"{name}: expected a finite number > 0, got {value}")
        check(self.gptq_block_size >= 1, "gptq_block_size: expected >= 1")
        check(math.isfinite(self.gptq_damp) and self.gptq_damp >= 0,
              f"gptq_damp: expected a finite number >= 0, got {self.gptq_damp}")
        check(self.lqer_top_k >= 0 and self.lqer_rank >= 1, "lqer_top_k/lqer_rank: expected top_k >= 0, rank >= 1")
        check(self.lqer_group_size >= 1, "lqer_group_size: expected >= 1")
        check(self.gate_min_elements >= 0, f"gate_min_elements: expected >= 0, got {self.gate_min_elements}")
        check(
            self.gate_max_elements is None or self.gate_max_elements >= self.gate_min_elements,
            f"gate_max_elements: expected null or >= gate_min_elements ({self.gate_min_elements}), got {self.gate_max_elements}",
        )


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """Compression of the quantized model and the counted-code convention of the size gate."""

    compressor: Literal["brotli", "lzma", "lrzip"] = "brotli"
    brotli_quality: int = 11
    byte_shuffle: bool = False
    # store each 2-D integer code matrix column by column: a column's codes share one scale of the input feature,
    # so brotli's context model sees runs of similar magnitude (record-size model: 16.007 -> 15.867 MB of codes)
    column_major_codes: bool = True
    # how the int8 code matrices are coded: "rans" (pgolf/artifact/entropy.py: per-(matrix, column class) frequency tables
    # and rANS; record-size model ~67 KB below column-major brotli) or "compressor" (left to the compressor)
    codes_coder: Literal["rans", "compressor"] = "rans"
    rans_column_groups: int = 4  # column classes per matrix (2..6 measured within 2 KB of each other at record size)
    code_bytes_convention: Literal["wrapper", "file"] = "wrapper"
    size_cap_bytes: int = 16_000_000
    # hex characters kept of each tensor entry's sha256 in the artifact: 64 cost ~32 incompressible bytes per
    # entry (~6 KB for the record); 16 still catch any accidental corruption (the body sha256 is always full)
    sha256_hex_chars: int = 16
    # the pack report's "brotli alone" comparison figure: a second full compression of the model, ~100 s at record
    # size per seed; false leaves plain_brotli_model_bytes / gain_vs_plain_brotli_bytes null (artifact unchanged)
    compare_plain_brotli: bool = True

    def __post_init__(self) -> None:
        check(0 <= self.brotli_quality <= 11, f"brotli_quality: expected 0..11, got {self.brotli_quality}")
        check(self.size_cap_bytes > 0, "size_cap_bytes: expected > 0")
        check(16 <= self.sha256_hex_chars <= 64, f"sha256_hex_chars: expected 16..64, got {self.sha256_hex_chars}")
        check(1 <= self.rans_column_groups <= 255, f"rans_column_groups: expected 1..255, got {self.rans_column_groups}")


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

    ``variant`` (mode ``lora``): ``record`` is the record's phased LoRA TTT (PR #1855 ``eval_val_ttt_phased``,
    pgolf/evaluate/ttt_record.py): targets through the next document's BOS, batches cut from the short end of the
    ascending sort and queued longest first, exact windows, one adapter set per block APPLICATION with an o adapter
    on the attention input and a dim -> dim MLP bypass, fused AdamW; a phase fires after a queue prefix (``lanes``,
    ``inflight``) and trains on the SHORTEST ``phase_boundaries_docs[k]`` scored documents, concatenated and cut in
    ``phase_chunk_tokens`` chunks (the last one untrained), ``phase_rows`` rows per chunk, gradient clipping,
    cosine lr. ``legacy`` is pgolf's earlier variant (pgolf/evaluate/ttt.py: longest-first batches, power-of-two
    slots, adapters shared by a looped layer's passes on q/k/v/o/mlp.up/mlp.down, phases after rounds on the scored
    prefix).
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
    # eval-time bigram hash embedding (PR #1523, pgolf/evaluate/bigram_hash.py), chunked mode only: a table of this many
    # buckets x bigram_hash_dim (0 = model_dim) added to the token embedding, zero contribution at creation, trained
    # only by the score-first loop; not part of the artifact. 0 buckets = off.
    bigram_hash_buckets: int = 0
    bigram_hash_dim: int = 0
    debug_update_before_score: bool = False
    # which LoRA TTT (see the class doc): "legacy" (pgolf's earlier one) or "record" (PR #1855's)
    variant: Literal["legacy", "record"] = "legacy"
    adam_eps: float = 1e-8  # AdamW epsilon of the adapters (the record: 1e-10)
    phase_grad_clip: float = 0.0  # max gradient norm of a phase step; 0 = no clipping (the record: 1.0)
    # record variant only:
    # adapter chains (the record's ranks): a lane carries each slot's A from batch to batch between phases. Which
    # lane runs which batch is the record's dynamic claiming simulated with fixed step prices, so the scores do not
    # depend on how many GPUs run the lanes (lane l runs on GPU l % world). 1 = the record's one-process order.
    lanes: int = 1
    inflight: int = -1  # batches still running when a phase's boundary is reached (the record's 8 ranks: 7); -1 = lanes - 1
    # first-segment batches that feed no phase get fresh adapters and the pre-phase weights, and run beside the
    # phased work (in the last segment) instead of before the first phase. false = the record's order.
    side_batches: bool = False
    phase_rows: int = 1  # rows each phase chunk is split into (the record's 8 ranks: 8), one per GPU when they match
    cuda_graphs: bool = False  # replay CUDA graphs for the short steps (full batch rows, widths <= cuda_graph_max_width)
    cuda_graph_max_width: int = 480

    def __post_init__(self) -> None:
        check(self.lora_rank >= 1, f"lora_rank: expected >= 1, got {self.lora_rank}")
        check(self.lora_alpha > 0, f"lora_alpha: expected > 0, got {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        check(not unknown, f"lora_targets: unknown target(s) {unknown}; allowed: {', '.join(LORA_TARGETS)}")
        check(len(set(self.lora_targets)) == len(self.lora_targets), f"lora_targets: duplicates in {list(self.lora_targets)}")
        check(self.mode != "lora" or len(self.lora_targets) >= 1, "lora_targets: expected at least one target in mode 'lora'")
        check(self.chunk_tokens >= 1, f"chunk_tokens: expected >= 1, got {self.chunk_tokens}")
        check(self.docs_per_batch >= 1, f"docs_per_batch: expected >= 1, got {self.docs_per_batch}")
        check(
            self.context_tokens >= self.chunk_tokens,
            f"context_tokens: expected >= chunk_tokens ({self.chunk_tokens}), got {self.context_tokens}",
        )
        lengths = self.slot_lengths
        check(
            not lengths or (all(n >= 1 for n in lengths) and all(a < b for a, b in zip(lengths, lengths[1:]))
                            and lengths[-1] >= self.context_tokens),
            f"slot_lengths: expected increasing lengths, the last >= context_tokens ({self.context_tokens}), got {list(lengths)}",
        )
        check(self.lr > 0, f"lr: expected > 0, got {self.lr}")
        check(0.0 <= self.beta1 < 1.0, f"beta1: expected 0 <= beta1 < 1, got {self.beta1}")
        check(0.0 <= self.beta2 < 1.0, f"beta2: expected 0 <= beta2 < 1, got {self.beta2}")
        check(self.weight_decay >= 0, f"weight_decay: expected >= 0, got {self.weight_decay}")
        bounds = self.phase_boundaries_docs
        check(
            all(b >= 1 for b in bounds) and all(a < b for a, b in zip(bounds, bounds[1:])),
            f"phase_boundaries_docs: expected strictly increasing document counts >= 1, got {list(bounds)}",
        )
        check(self.phase_lr >= 0, f"phase_lr: expected >= 0, got {self.phase_lr}")
        check(0.0 <= self.phase_momentum < 1.0, f"phase_momentum: expected 0 <= m < 1, got {self.phase_momentum}")
        check(self.phase_chunk_tokens >= 2, f"phase_chunk_tokens: expected >= 2, got {self.phase_chunk_tokens}")
        check(self.stream_chunk_tokens >= 1, f"stream_chunk_tokens: expected >= 1, got {self.stream_chunk_tokens}")
        check(self.chunk_epochs >= 0, f"chunk_epochs: expected >= 0, got {self.chunk_epochs}")
        check(self.chunk_lr >= 0, f"chunk_lr: expected >= 0, got {self.chunk_lr}")
        check(0.0 <= self.chunk_momentum < 1.0, f"chunk_momentum: expected 0 <= m < 1, got {self.chunk_momentum}")
        check(self.bigram_hash_buckets >= 0, f"bigram_hash_buckets: expected >= 0 (0 = off), got {self.bigram_hash_buckets}")
        check(self.bigram_hash_dim >= 0, f"bigram_hash_dim: expected >= 0 (0 = model_dim), got {self.bigram_hash_dim}")
        check(
            self.bigram_hash_buckets == 0 or self.mode == "chunked",
            f"bigram_hash_buckets: the eval-time bigram hash is trained by chunked TTT; mode is {self.mode!r}",
        )
        check(self.adam_eps > 0, f"adam_eps: expected > 0, got {self.adam_eps}")
        check(self.phase_grad_clip >= 0, f"phase_grad_clip: expected >= 0 (0 = off), got {self.phase_grad_clip}")
        check(self.lanes >= 1, f"lanes: expected >= 1, got {self.lanes}")
        check(self.inflight >= -1, f"inflight: expected >= 0, or -1 for lanes - 1, got {self.inflight}")
        check(self.phase_rows >= 1, f"phase_rows: expected >= 1, got {self.phase_rows}")
        check(self.cuda_graph_max_width >= 1, f"cuda_graph_max_width: expected >= 1, got {self.cuda_graph_max_width}")
        if self.variant == "record" and self.mode == "lora":
            check(self.optimizer == "adamw", f"optimizer: the record variant trains its adapters with AdamW, got {self.optimizer!r}")
            check(not self.slot_lengths, "slot_lengths: the record variant uses exact windows; leave slot_lengths empty")
            check(all(t in self.lora_targets for t in ("q", "v", "head")),
                  f"lora_targets: the record variant always adapts q, v and the head, got {list(self.lora_targets)}")

    @property
    def inflight_batches(self) -> int:
        """``inflight`` with -1 resolved to ``lanes - 1``."""
        return self.lanes - 1 if self.inflight < 0 else self.inflight


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
    # Where PR #1855's metric differs from pgolf's, both are named options: these defaults keep pgolf's, config.yaml
    # sets the record's (issue 15; pgolf/evaluate/valdata.py and scoring.py say exactly what each computes).
    # ``record``: the stream cut to (N - 1) // eval_seq_len * eval_seq_len + 1 tokens, as the record loads it;
    # ``none`` (pgolf): the whole stream is scored.
    stream_truncation: Literal["none", "record"] = "none"
    # true (PR #1855): the next document's BOS is a target of the document before it, with 0 bytes (N - 1 targets);
    # false (pgolf): a BOS is never a target (N - D targets).
    score_next_bos: bool = False
    # The no-TTT diagnostics (pre-/post-quant). ``documents`` (pgolf): every target once, each document on its own
    # windows. ``record_flat`` (PR #1855's eval_val, comparable with its "diagnostic" log lines): the stream in
    # contiguous rows of record_flat_batch_seqs * eval_seq_len tokens split over record_flat_world_size ranks the
    # record's way (each rank's tail dropped), every target of a row scored; attention windows restart at each
    # BOS and every eval_seq_len tokens after it. pgolf's process count does not change the number.
    diagnostic_scoring: Literal["documents", "record_flat"] = "documents"
    record_flat_world_size: int = 8  # the record's GPU count (its logs are 8-GPU numbers)
    record_flat_batch_seqs: int = 32  # rows of eval_seq_len per batch: VAL_BATCH_TOKENS 524288 / 8 ranks / 2048
    # dtype of the softcap at scoring. ``model`` (PR #1855): cap * tanh(z / cap) on the head's output in its own
    # dtype (bf16 under CUDA autocast), then float32 for the cross-entropy; ``float32`` (pgolf): on float32 logits.
    softcap_dtype: Literal["float32", "model"] = "float32"
    # Parameter storage of the model built from the artifact (same names as train.param_storage). ``record``
    # (PR #1855's deserialize: a bf16 template, W.to(orig_dtype)): the token embedding's dequantized values rounded
    # to bf16 (held in float32); ``fp32`` (pgolf): as dequantized. A recipe sets it equal to train.param_storage
    # (checked); the pre-quant diagnostic builds a checkpoint under the storage it was trained under.
    param_storage: Literal["fp32", "record"] = "fp32"
    # dtype of the token embedding (= tied head) of the evaluated model on CUDA: the record keeps it in bfloat16
    # after deserializing (its restore_fp32_params leaves tok_emb out), so its residual stream and its phase SGD of
    # the embedding run in bf16; "float32" keeps pgolf's full-precision copy. CPU evaluations always use float32.
    embed_dtype: Literal["float32", "bfloat16"] = "float32"
    ttt: TTTConfig = dataclasses.field(default_factory=TTTConfig)
    # torch's intra-op CPU threads for this stage (CPU evaluation) (the stage sets it itself, on every entry point): CPU float sums
    # depend on the thread count, so a stage whose CPU numbers must be the same from the staged pipeline and from
    # train_gpt.py sets a number here. 0 (pgolf's default): leave torch's default (OMP_NUM_THREADS or the core
    # count), which differs between Snakemake jobs, torchrun and a plain run.
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        check(self.cpu_threads >= 0, f"cpu_threads: expected >= 0 (0 = torch's default), got {self.cpu_threads}")
        check(self.eval_seq_len >= 1, f"eval_seq_len: expected >= 1, got {self.eval_seq_len}")
        check(  # a document split over rows continues behind its predecessor token (SmearGate's input)
            self.eval_batch_tokens > self.eval_seq_len,
            f"eval_batch_tokens: expected > eval_seq_len ({self.eval_seq_len}): a row needs room for a document's "
            f"predecessor token beside a whole window, or a document split over rows is scored without it; got "
            f"{self.eval_batch_tokens}",
        )
        check(self.max_eval_seconds > 0, f"max_eval_seconds: expected > 0, got {self.max_eval_seconds}")
        check(self.warn_margin_seconds >= 0, f"warn_margin_seconds: expected >= 0, got {self.warn_margin_seconds}")
        check(self.compile_warmup_steps >= 0, f"compile_warmup_steps: expected >= 0, got {self.compile_warmup_steps}")
        check(self.max_docs >= 0, f"max_docs: expected >= 0 (0 = all), got {self.max_docs}")
        check(self.progress_every_seconds > 0, f"progress_every_seconds: expected > 0, got {self.progress_every_seconds}")
        check(self.record_flat_world_size >= 1, f"record_flat_world_size: expected >= 1, got {self.record_flat_world_size}")
        check(self.record_flat_batch_seqs >= 1, f"record_flat_batch_seqs: expected >= 1, got {self.record_flat_batch_seqs}")
        check(
            self.diagnostic_scoring != "record_flat" or self.score_next_bos,
            "score_next_bos: diagnostic_scoring 'record_flat' scores every target of its rows, next-document BOS "
            "included (the record's eval_val); expected true with it, so the diagnostics and the score count the same targets",
        )
        check(
            not (self.score_next_bos and self.ttt.mode == "lora" and self.ttt.variant == "legacy"),
            "score_next_bos: the legacy LoRA variant scores each document's own targets only (never the next "
            "document's BOS); expected false with ttt.variant 'legacy', or ttt.variant 'record'",
        )


_DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")


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

    The README's rule ("beat the record by at least 0.005 nats with p < 0.01") names no test. ``readme_null``
    says which null hypothesis its p-value is against: ``zero`` (the default) asks for a mean improvement of at
    least the threshold and p < readme_p against no improvement at all; ``threshold`` asks for p < readme_p
    against an improvement of exactly the threshold (a significant improvement of at least the threshold:
    stricter). The report gives both p-values whichever decides. ``baseline_std_ddof`` says which std
    ``baseline_std`` is: records publish either (PR #1855's ``val_bpb_std`` is the population std, ddof=0), and
    the test needs the sample std, so a ddof=0 value is converted (times sqrt(n / (n - 1))).
    """

    unit: Literal["nats_per_token", "bpb"] = "nats_per_token"
    baseline_name: str = ""  # e.g. the leaderboard row's PR, shown in the report
    baseline_seed_values: tuple[float, ...] = ()
    baseline_mean: Optional[float] = None
    baseline_std: Optional[float] = None  # std of the baseline's seeds (ddof: baseline_std_ddof); null = unknown
    baseline_std_ddof: Literal[1, 0] = 1  # 1: sample std; 0: population std (converted to the sample std)
    baseline_n: int = 0  # number of baseline seeds behind baseline_mean
    baseline_unit: Literal["bpb", "nats_per_token"] = "bpb"
    readme_threshold_nats: float = 0.005  # README: beat the record by at least this many nats per token ...
    readme_p: float = 0.01  # ... with p below this
    readme_null: Literal["zero", "threshold"] = "zero"  # the null hypothesis of that p (class docstring)
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
        check(
            not (has_values and has_summary),
            "baseline_seed_values and baseline_mean: give one of them (per-seed values, or mean/std/n), not both",
        )
        if has_values:
            check(
                len(self.baseline_seed_values) >= 2,
                f"baseline_seed_values: expected at least 2 values for a Welch test, got {len(self.baseline_seed_values)}",
            )
            check(
                self.baseline_std is None and self.baseline_n == 0,
                "baseline_std/baseline_n: derived from baseline_seed_values; leave them unset",
            )
        else:
            check(self.baseline_std is None or has_summary, "baseline_std: needs baseline_mean")
            if has_summary:
                check(self.baseline_n >= 1, f"baseline_n: expected >= 1 with baseline_mean, got {self.baseline_n}")
            if self.baseline_std is not None:
                check(self.baseline_std >= 0, f"baseline_std: expected >= 0, got {self.baseline_std}")
                check(self.baseline_n >= 2, f"baseline_n: a known baseline_std needs >= 2 seeds, got {self.baseline_n}")
        check(self.baseline_n >= 0, f"baseline_n: expected >= 0, got {self.baseline_n}")
        check(self.readme_threshold_nats >= 0, f"readme_threshold_nats: expected >= 0, got {self.readme_threshold_nats}")
        for name in ("readme_p", "progression_p"):
            value = getattr(self, name)
            check(0.0 < value < 1.0, f"{name}: expected 0 < p < 1, got {value}")
        check(
            self.date == "" or bool(_DATE_PATTERN.match(self.date)),
            f"date: expected YYYY-MM-DD or empty (today), got {self.date!r}",
        )
        check(self.submission_name == "" or FOLDER_NAME.fullmatch(self.submission_name) is not None,
              folder_name_error("submission_name", self.submission_name))

    @property
    def has_baseline(self) -> bool:
        return len(self.baseline_seed_values) > 0 or self.baseline_mean is not None
