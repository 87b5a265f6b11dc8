"""The configuration sections of the stages up to training: data, tokenizer, model, optimizer, training."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from pgolf.config.strict import FOLDER_NAME, check, folder_name_error

# Exact duplicates across the split (issue 15 item 7): what the data stage does with a training document whose
# tokens equal those of a validation document. See DataConfig.val_duplicates_policy.
VAL_DUPLICATES_POLICIES = ("drop_train_copies", "refuse")
DEFAULT_MAX_VAL_OVERLAP_FRACTION = 0.01


def val_overlap_limit(val_docs: int, fraction: float) -> int:
    """The most validation documents that may have a copy in training: floor(fraction * val_docs)."""
    return int(fraction * val_docs + 1e-9)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the documents or shards come from and how they are split and cut.

    ``source``:
      - ``docs``: download raw ``docs_selected.jsonl`` (+ its source manifest) from the Hub and tokenize here;
      - ``export``: download an already-tokenized export (shards + tokenizer + manifest) from the Hub;
      - ``local``: tokenize a local JSONL file of documents (``docs_path``), e.g. the bundled sample corpus.

    Validation documents that also occur in the training part (exact duplicates: equal token ids, i.e. texts
    equal after the tokenizer's normalization), ``val_duplicates_policy``:
      - ``drop_train_copies`` (default): local preparation (source docs/local) writes no training copy of a
        validation document and reports how many it dropped (manifest ``val_duplicates``); a published export
        (source=export) cannot be re-cut without training on other data than the record did, so it is accepted as
        published and its overlap is counted in ``verified.json``;
      - ``refuse``: any such document is an error (preparation and verification).
    Under either policy more than ``max_val_overlap_fraction`` of the validation documents with a copy in
    training is an error: natural duplicates in a deduplicated web corpus are rare, while a wrong split
    (validation documents taken from the training pool, the 10,000-document cut of issue #2127 next to the
    official validation set) puts tens of percent or all of them in training.
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
    train_shards: int = 80  # export: how many train shards to download; docs/local: cap on train shards written; 0: all
    val_docs: int = 50_000
    shard_tokens: int = 100_000_000
    workers: int = 0  # tokenization processes; 0 = all cores
    val_duplicates_policy: Literal["drop_train_copies", "refuse"] = "drop_train_copies"  # see the class docstring
    # above floor(fraction * val_docs) validation docs with a training copy, the split itself is wrong: refused
    max_val_overlap_fraction: float = DEFAULT_MAX_VAL_OVERLAP_FRACTION

    def __post_init__(self) -> None:
        check(FOLDER_NAME.fullmatch(self.name) is not None, folder_name_error("name", self.name))
        check(self.val_docs > 0, f"val_docs: expected > 0, got {self.val_docs}")
        check(self.shard_tokens > 0, f"shard_tokens: expected > 0, got {self.shard_tokens}")
        check(self.train_shards >= 0, f"train_shards: expected >= 0, got {self.train_shards}")
        check(self.max_docs >= 0, f"max_docs: expected >= 0, got {self.max_docs}")
        check(self.workers >= 0, f"workers: expected >= 0, got {self.workers}")
        check(
            0.0 <= self.max_val_overlap_fraction <= 1.0,
            f"max_val_overlap_fraction: expected a fraction in [0, 1], got {self.max_val_overlap_fraction}",
        )
        check(
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
        check(self.vocab_size >= 264, f"vocab_size: expected >= 264 (4 special + 4 operators + 256 bytes), got {self.vocab_size}")
        check(self.vocab_size <= 65536, f"vocab_size: expected <= 65536 (uint16 shards), got {self.vocab_size}")
        check(self.source != "path" or bool(self.path), "path: required when source is 'path'")
        check(self.train_docs >= 0, f"train_docs: expected >= 0, got {self.train_docs}")


MAX_LAYERS = 1024  # a sanity bound: the virtual layer order is built as a list


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
    # the position a rotary angle is taken from: "segment" = the token's index in its document (segment of
    # cu_seqlens), looked up per token in the cached tables; "row" = its index in the packed row the forward
    # receives (the record's: 0..98,303 over a training micro-batch), a slice of the tables, which the training
    # and evaluation stages grow to their rows before compiling (pgolf.model.rope.extend_rope_cache). Attention
    # never crosses a segment and RoPE is relative, so both give the same model up to the fp32 rounding of large
    # angles; "row" is the record's and needs no per-token position gather (faster); "segment" keeps every angle
    # small.
    rope_positions: Literal["row", "segment"] = "row"
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
    # attention KERNELS, not the math: auto = the fastest installed (FlashAttention 3, then 4, then torch's varlen
    # kernels on CUDA; the banded SDPA on CPU); fa3 / fa4 / torch force one (an unusable one is an error).
    # Resolved by each stage on its own device and recorded in train_summary.json, checkpoint.json and eval.json.
    attention_backend: Literal["auto", "fa3", "fa4", "torch"] = "auto"

    def __post_init__(self) -> None:
        check(1 <= self.num_layers <= MAX_LAYERS, f"num_layers: expected 1..{MAX_LAYERS}, got {self.num_layers}")
        check(self.model_dim >= 1, f"model_dim: expected >= 1, got {self.model_dim}")
        check(self.num_heads >= 1, f"num_heads: expected >= 1, got {self.num_heads}")
        check(self.model_dim % self.num_heads == 0, f"model_dim: {self.model_dim} not divisible by num_heads {self.num_heads}")
        check(math.isfinite(self.mlp_mult) and int(self.mlp_mult * self.model_dim) >= 1,
              f"mlp_mult: expected a finite number with mlp_mult * model_dim >= 1, got {self.mlp_mult}")
        for name in ("logit_softcap", "embed_init_std", "q_gain_init"):  # 0 disables the first and last
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"{name}: expected a finite number >= 0, got {value}")
        check(math.isfinite(self.rope_base) and self.rope_base > 0, f"rope_base: expected a finite number > 0, got {self.rope_base}")
        for name in ("leaky_relu_slope", "attn_gate_scale"):
            check(math.isfinite(getattr(self, name)), f"{name}: expected a finite number, got {getattr(self, name)}")
        check(
            self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
            f"num_kv_heads: expected a divisor of num_heads {self.num_heads}, got {self.num_kv_heads}",
        )
        head_dim = self.model_dim // self.num_heads
        check(0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0, f"rope_dims: expected an even number in [0, {head_dim}], got {self.rope_dims}")
        check(0 <= self.xsa_last_n <= self.num_layers, f"xsa_last_n: expected 0..{self.num_layers}, got {self.xsa_last_n}")
        check(self.loop_count >= 1, f"loop_count: expected >= 1, got {self.loop_count}")
        if self.loop_count > 1:
            check(
                0 <= self.loop_start <= self.loop_end < self.num_layers,
                f"loop_start/loop_end: expected 0 <= loop_start <= loop_end < num_layers={self.num_layers}, "
                f"got {self.loop_start}..{self.loop_end}",
            )
        check(
            self.parallel_residual_start == -1 or 0 <= self.parallel_residual_start < self.num_layers,
            f"parallel_residual_start: expected -1 or 0..{self.num_layers - 1}, got {self.parallel_residual_start}",
        )
        for looping in (False, True):
            stale = self._single_lane_after_lanes(looping)
            check(
                stale is None,
                f"parallel_residual_start: {self.parallel_residual_start} makes decoder application {stale} single-lane "
                f"after the two lanes started (looping {'on' if looping else 'off'}); its output would be discarded",
            )
        check(1 <= self.attn_gate_window <= self.model_dim, f"attn_gate_window: expected 1..{self.model_dim}, got {self.attn_gate_window}")
        check(1 <= self.smear_gate_window <= self.model_dim, f"smear_gate_window: expected 1..{self.model_dim}, got {self.smear_gate_window}")
        check(self.vocab_size >= 2, f"vocab_size: expected >= 2, got {self.vocab_size}")

    def _single_lane_after_lanes(self, looping: bool) -> Optional[int]:
        """Position of a decoder application of a layer below ``parallel_residual_start`` that follows a two-lane
        one (the record runs it on the stale single-lane state and discards it), or None."""
        if self.parallel_residual_start < 0:
            return None
        order = list(range(self.num_layers))
        if looping and self.loop_count > 1:
            loop = list(range(self.loop_start, self.loop_end + 1))
            order = list(range(self.loop_start)) + loop * self.loop_count + list(range(self.loop_end + 1, self.num_layers))
        split = False
        for position in range(len(order) // 2, len(order)):
            if order[position] >= self.parallel_residual_start:
                split = True
            elif split:
                return position
        return None

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
    # Muon's arithmetic. ``fp32_momentum`` (pgolf): fp32 gradient and momentum, Newton-Schulz normalized in fp32
    # (bf16 iterations on CUDA). ``record_bf16`` (PR #1855): the gradient rounded to bf16 (and averaged over ranks
    # in bf16), bf16 momentum, every Newton-Schulz op in bf16 (issue 15 item 5: the rounding order alone moves the
    # update by ~4 % in 3 steps, so the record recipe follows it).
    muon_precision: Literal["fp32_momentum", "record_bf16"] = "fp32_momentum"
    # ``cuda`` (pgolf): fused AdamW on CUDA, foreach on CPU. ``always`` (PR #1855): fused everywhere (CPU too; the
    # two differ in the last bits, so the CPU oracle tests need the record's choice).
    adam_fused: Literal["cuda", "always"] = "cuda"

    def __post_init__(self) -> None:
        for name in ("matrix_lr", "embed_lr", "scalar_lr", "muon_weight_decay", "embed_weight_decay",
                     "scalar_weight_decay"):  # torch checks a group's values only where they are its defaults
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"{name}: expected a finite number >= 0, got {value}")
        for name in ("muon_momentum", "muon_momentum_warmup_start", "adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"{name}: expected 0 <= value < 1, got {value}")
        check(math.isfinite(self.adam_eps) and self.adam_eps > 0, f"adam_eps: expected a finite number > 0, got {self.adam_eps}")
        check(self.muon_momentum_warmup_steps >= 0,
              f"muon_momentum_warmup_steps: expected >= 0, got {self.muon_momentum_warmup_steps}")
        check(self.ns_steps >= 1, f"ns_steps: expected >= 1, got {self.ns_steps}")
        check(
            self.ns_coefficients != "polar_express" or self.ns_steps <= 5,
            f"ns_steps: polar_express has 5 coefficient tuples, got ns_steps={self.ns_steps}",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Batch, schedule and budget of the training stage (the model and optimizer are their own sections).

    Where PR #1855's loop differs from pgolf's, both behaviours are named options: the defaults here keep pgolf's
    (world-size independent data and clipping, full warm-up restore, fp32 storage, Hessians inside the budget), and
    ``config.yaml`` sets every record value explicitly (issue 22). So these keys, unlike the rest, do NOT default to
    the record recipe.
    """

    train_batch_tokens: int = 786_432  # global tokens per optimizer step, identical on 1 or N GPUs
    micro_batch_tokens: int = 98_304  # tokens per rank per forward (one packed varlen row)
    train_seq_len: int = 2048  # documents are cut into pieces of at most this many tokens
    max_wallclock_seconds: float = 600.0  # 0: step-based schedule over `iterations`
    # How the 600 s rule is read. ``strict`` (pgolf, rules.md): the loop AND the Hessian pass after it must fit
    # max_wallclock_seconds, so reserve_seconds is the Hessians' allowance. ``record`` (PR #1855's run): the cap
    # bounds the training loop only; the Hessians run after it, uncounted. `pgolf comply` reports both figures.
    budget_reading: Literal["strict", "record"] = "strict"
    reserve_seconds: float = 8.0  # the loop's schedule and stop run against max_wallclock_seconds - reserve_seconds
    iterations: int = 20_000  # step cap (and schedule length when max_wallclock_seconds == 0)
    warmdown_fraction: float = 0.85  # LR multiplier 1 until 1 - warmdown_fraction, then linear decay
    min_lr_fraction: float = 0.10  # LR floor as a fraction of the peak
    # Compile warm-up: this many real steps with looping off, then as many with looping on (when the model loops),
    # each with step index 0.., lr multiplier 1; then the state is restored (warmup_restore).
    warmup_steps: int = 10
    # Forward/backward passes (no update) per padded cu_seqlens length (the first four lengths of cu_seqlens_pad),
    # with looping off and then on, before the warm-up steps: the record compiles one graph per length. 0: none.
    warmup_cu_passes: int = 0
    # What survives the warm-up. ``full`` (pgolf): weights and every optimizer state are restored. ``record``
    # (PR #1855 under torchrun, its record run): Muon's momentum buffers keep the warm-up's values, because the
    # record's sharded Muon keeps them outside its state_dict; everything else is restored.
    warmup_restore: Literal["full", "record"] = "full"
    # The training token stream. ``contiguous`` (pgolf): one stream over all shards, micro-batch after micro-batch,
    # documents crossing shard boundaries, the same for any GPU count. ``record`` (PR #1855's loader): each loader
    # call takes one span of world_size * (n + 1) tokens inside one shard, starting at the shard's first BOS; a
    # shard's tail that cannot hold a span is dropped (pgolf.data.record_stream). Depends on the GPU count.
    data_stream: Literal["contiguous", "record"] = "contiguous"
    # Which rank gets which micro-batch of a step (slot q in stream order, rank r, accumulation index a of A).
    # ``blocked`` (pgolf): q = r * A + a. ``interleaved`` (PR #1855): q = a * world_size + r (the record stream is
    # interleaved by construction).
    micro_batch_order: Literal["blocked", "interleaved"] = "blocked"
    # cu_seqlens padding (zero-length segments, no numerical effect): ``pow2`` (pgolf: next power of two >= 16,
    # the length marked dynamic under compile) or ``multiple_of_64`` (PR #1855: one compiled graph per length).
    cu_seqlens_pad: Literal["pow2", "multiple_of_64"] = "pow2"
    # Gradient clipping with several ranks. ``global`` (pgolf): average every gradient, then clip the average.
    # ``per_rank`` (PR #1855): each rank clips its own accumulated gradient, then the clipped gradients are
    # averaged (AdamW's in fp32 by the loop, Muon's inside Muon at its precision).
    clip_scope: Literal["global", "per_rank"] = "global"
    grad_clip_norm: float = 0.3  # 0 disables
    ema_decay: float = 0.9965  # 0 disables
    # Parameter storage. ``fp32`` (pgolf): every parameter float32 from its init. ``record`` (PR #1855's
    # ``.bfloat16()`` + restore_fp32_params): every initial value rounded to bf16, the token embedding kept in
    # bf16 (its gradient and AdamW state too), the saved EMA rounded to those dtypes.
    param_storage: Literal["fp32", "record"] = "fp32"
    loop_enable_fraction: float = 0.35  # training fraction after which depth recurrence turns on
    compile: bool = True
    # Inductor's cap on the distinct buffers one generated kernel may read and write (torch.compile's
    # ``max_fusion_unique_io_buffers``) for the training step. 0 (default): inductor's own choice, no cap. Why it
    # exists: with looping on, inductor's mix-order reduction fuses the per-channel parameter sums of the looped
    # blocks into one kernel that reads ~30 [tokens, 512] tensors and keeps 27 accumulators; 12 or 16 split it into
    # kernels of <= 3 or 4 (docs/benchmarks.md, "Generated kernels"). It groups the same sums differently (float
    # rounding order of those reductions), nothing else: the model computes the same function.
    compile_max_fusion_io_buffers: int = 0
    # Inductor's mix-order reduction (``torch._inductor.config.triton.mix_order_reduction``) for the training step.
    # False (default) makes the per-channel parameter sums of the backward plain column reductions instead of fusing
    # them into the row reductions (RMSNorm backward) that read the same tensors: more passes over [tokens, 512]
    # tensors, no kernel with tens of accumulators; true leaves inductor's choice. Why: the looping-on backward's two
    # costliest generated kernels were such fusions (issue 16); on one H200 (2026-12-05, FA4) false took the
    # record recipe's step from 1,057 to 988 ms looping on and left looping off unchanged (docs/benchmarks.md). Like
    # the cap, it regroups the same sums, nothing else.
    compile_mix_order_reduction: bool = False
    # Inductor's fusion of a residual add into the matmul that feeds it (``x + a @ b`` -> cuBLAS ``addmm``). True
    # leaves inductor's choice; false (default) keeps the matmul plain and the add in the next generated kernel
    # (pgolf.model.compile_passes). Why: for a [tokens, 512] ``x`` cuBLAS's addmm first copies x into its output:
    # 4.3 ms a step looping off on one H100; net 0.9 ms a step, the add landing in generated kernels
    # (docs/benchmarks.md). The product is rounded to bf16 before the add, as in eager PyTorch, instead of once
    # after it.
    compile_add_into_matmul: bool = False
    fused_kernels: bool = True  # Triton MLP + softcapped CE (pgolf/model/kernels.py; passed `pytest -m gpu` on an H100)
    # Two elementwise stretches of every attention as one Triton kernel each, forward and backward
    # (pgolf.model.attn_kernels): the q/k RMSNorm + partial RoPE + q gain, and XSA + the output gate. The same
    # function (float32 inside, rounded once). One H100, FA4, record recipe: 729.9 -> 692.6 ms/step looping off,
    # 1,089.0 -> 1,033.7 on, 2.1 / 3.3 GiB less peak memory (docs/benchmarks.md); `pytest -m gpu` passed with them
    # (at 510f0d9 with FA4; the q/k kernel's token strides, added since, passed its GPU tests at 5623981).
    fused_qk_norm_rope: bool = True
    fused_xsa_gate: bool = True
    # With fused_xsa_gate: the output gate's 12-input projection and its two gradients as two Triton kernels
    # (pgolf.model.attn_kernels.gate_linear) instead of cuBLAS, which runs them as K = 12 wmma GEMMs (4.1 ms a step
    # looping off on one H100, docs/benchmarks.md). The same products, summed in another order. One H100, FA4,
    # same lease: 646.2 -> 642.8 ms/step looping off; its GPU tests passed (2026-12-06).
    fused_gate_linear: bool = True
    # With fused_qk_norm_rope: each attention's q, k and v as ONE matmul with the stacked weights, the q/k kernels
    # reading their heads out of its output and writing the gradients of q, k and v into one tensor for ONE
    # backward matmul (pgolf.model.attn_kernels.qkv_linear_norm_rope; on Hopper the matmul and the q/k kernels are
    # one Triton kernel, the kernels as the matmul's epilogue). The same dot products; three matmuls become one
    # forward and two backward, and the backward's sum of three input gradients is gone. Hooked or wrapped
    # projections (Hessians, LoRA) are used separately. One H100, torch attention, looping off: 780.6 -> 773.4
    # ms/step (docs/benchmarks.md); with FA4 the record recipe's step went 0.935x -> 0.927x of the record's (two
    # leases, not an on/off pair).
    fused_qkv_matmul: bool = True
    # With fused_qkv_matmul: the q/k/v op writes each k and v head once per query head of its group, so the attention
    # kernel sees as many k / v heads as q heads and runs without GQA (pgolf.model.attn_kernels.qkv_norm_rope,
    # ``kv_repeat``). The same function (the copies' gradients are summed in fp32 and rounded once). Why:
    # FlashAttention 4's GQA backward on Hopper accumulates dK and dV in zero-filled fp32 scratch with atomic adds
    # and converts them in a postprocess pass; the copies cost less. One H100, FA4, record recipe, same lease:
    # 664.6 -> 656.1 ms/step looping off, 991.7 -> 978.9 on, +1.5 / +2.4 GiB peak memory (docs/benchmarks.md).
    # Timed with FA4 only; on for every backend (FA3's GQA backward also accumulates in fp32 scratch, and torch
    # 2.11's varlen attention makes the copies itself). No effect without fused_qkv_matmul (and its q/k kernel), or
    # where q, k, v are hooked or wrapped.
    repeat_kv_heads: bool = True
    # Each block's attn_scale / mlp_scale multiplied into the rows of its o / down weight ([d, d_in], once per call)
    # instead of into the [tokens, d] sublayer outputs (pgolf.model.gpt.GPT.fold_output_scales). The same function,
    # float rounding aside; the backward then takes the scales' gradients from the weight gradients instead of
    # per-channel sums over the tokens, and never writes the scaled output gradient. One H100, FA4, record recipe:
    # 683.1 -> 671.3 ms/step looping off, 1,019.8 -> 1,001.6 on (docs/benchmarks.md). Every device (pure PyTorch);
    # the Hessian and evaluation models are built without it, and a hooked or wrapped o / down is used unfolded.
    fold_output_scales: bool = True
    # Each micro-batch's compiled forward and backward captured as a CUDA graph (once per shape and loop state) and
    # replayed (pgolf.train.graphs). The same kernels on the same tensors: what the model computes does not change.
    # Why: with FlashAttention 4 on one H200 the GPU waited ~46 ms of a 586 ms step for the host's launches
    # (docs/benchmarks.md). The activations then live in the graphs' memory pool (train_summary's cuda_graphs says
    # how big). CUDA only; a capture that fails is reported and the run goes on eagerly. One H100, FA4, same lease:
    # 622.8 -> 618.9 ms/step looping off, 928.8 -> 921.3 on (docs/benchmarks.md).
    cuda_graphs: bool = True
    # Each micro-batch's parameter gradients added into the persistent .grad buffers inside the compiled backward
    # (fused with the kernel that produces them) instead of by autograd's AccumulateGrad, one add kernel per
    # parameter, after it (pgolf.train.grad_fusion). The same sums in the same dtype; compiled, a reduction inductor
    # fuses with the add may round differently in the last bits (eagerly: bit for bit). Why: those adds took 2.6 ms a
    # step on one H100 (record recipe, looping off); on, the same lease: 910.0 -> 905.7 ms looping on (docs/benchmarks.md).
    fused_grad_accumulation: bool = True
    log_every_steps: int = 10
    # Sweeps: save the whole training state every N steps under <train dir>/resume/ (no rule declares it, so
    # Snakemake never deletes it) and resume an interrupted job from there, bit for bit (pgolf.train.resume).
    # 0: off. A record run is one uninterrupted timed run: record mode refuses N > 0, and an interrupted record run
    # starts over from step 0, saying so.
    resume_every_steps: int = 0
    # ILLEGAL (rules C3/C4, "pre-quant TTT" of PRs #1376/#1485/#1487): AdamW epochs on the VALIDATION tokens after
    # training, before GPTQ. It exists only so such a submission can be reproduced as a labelled sweep: a record
    # recipe refuses it, and the checkpoint records ``prequant_ttt_val_tokens`` so `pgolf comply` rejects the run.
    prequant_ttt_epochs: int = 0
    prequant_ttt_lr: float = 5e-4  # AdamW lr of that pass (PR #1487's value is not known; pgolf's choice)
    # torch's intra-op CPU threads for this stage (CPU training) (the stage sets it itself, on every entry point): CPU float sums
    # depend on the thread count, so a stage whose CPU numbers must be the same from the staged pipeline and from
    # train_gpt.py sets a number here. 0 (pgolf's default): leave torch's default (OMP_NUM_THREADS or the core
    # count), which differs between Snakemake jobs, torchrun and a plain run.
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        check(self.prequant_ttt_epochs >= 0, f"prequant_ttt_epochs: expected >= 0, got {self.prequant_ttt_epochs}")
        check(self.prequant_ttt_lr > 0, f"prequant_ttt_lr: expected > 0, got {self.prequant_ttt_lr}")
        check(self.train_seq_len >= 2, f"train_seq_len: expected >= 2, got {self.train_seq_len}")
        check(self.micro_batch_tokens >= self.train_seq_len, "micro_batch_tokens: expected >= train_seq_len")
        check(
            self.train_batch_tokens % self.micro_batch_tokens == 0,
            f"train_batch_tokens: expected a multiple of micro_batch_tokens={self.micro_batch_tokens}, got {self.train_batch_tokens}",
        )
        check(math.isfinite(self.max_wallclock_seconds) and self.max_wallclock_seconds >= 0,
              f"max_wallclock_seconds: expected a finite number >= 0 (0 = by iterations), got {self.max_wallclock_seconds}")
        check(math.isfinite(self.grad_clip_norm) and self.grad_clip_norm >= 0,
              f"grad_clip_norm: expected a finite number >= 0 (0 = no clipping), got {self.grad_clip_norm}")
        check(
            self.reserve_seconds >= 0 and (self.max_wallclock_seconds == 0 or self.reserve_seconds <= self.max_wallclock_seconds),
            f"reserve_seconds: expected 0..max_wallclock_seconds={self.max_wallclock_seconds}, got {self.reserve_seconds}",
        )
        check(self.iterations >= 1, f"iterations: expected >= 1, got {self.iterations}")
        check(0.0 <= self.warmdown_fraction <= 1.0, f"warmdown_fraction: expected 0..1, got {self.warmdown_fraction}")
        check(0.0 <= self.min_lr_fraction <= 1.0, f"min_lr_fraction: expected 0..1, got {self.min_lr_fraction}")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay: expected 0 <= d < 1, got {self.ema_decay}")
        check(0.0 <= self.loop_enable_fraction <= 1.0, f"loop_enable_fraction: expected 0..1, got {self.loop_enable_fraction}")
        check(self.warmup_steps >= 0, f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        check(self.warmup_cu_passes >= 0, f"warmup_cu_passes: expected >= 0, got {self.warmup_cu_passes}")
        check(
            self.data_stream != "record" or self.micro_batch_order == "interleaved",
            "micro_batch_order: the record data stream deals a step's micro-batches to ranks interleaved "
            f"(slot = a * world_size + r); expected 'interleaved' with data_stream 'record', got {self.micro_batch_order!r}",
        )
        check(self.log_every_steps >= 1, "log_every_steps: expected >= 1")
        check(
            self.compile_max_fusion_io_buffers == 0 or self.compile_max_fusion_io_buffers >= 2,
            "compile_max_fusion_io_buffers: expected 0 (no cap) or >= 2 (a kernel reads one buffer and writes one), "
            f"got {self.compile_max_fusion_io_buffers}",
        )
        check(self.cpu_threads >= 0, f"cpu_threads: expected >= 0 (0 = torch's default), got {self.cpu_threads}")
        check(self.resume_every_steps >= 0, f"resume_every_steps: expected >= 0 (0 = off), got {self.resume_every_steps}")
