"""Every recipe runs end to end on CPU: the same features, tiny sizes.

Each recipe's resolved config (config.yaml = PR #1855, and recipes/pr*.yaml) is shrunk by :func:`shrink`, which
changes SIZES only (layers, width, heads, vocabulary, batch, steps, Hessian rows, LQER sizes, TTT chunks and
documents) and keeps every feature switch: tied embeddings, softcap, QK norm, partial RoPE, XSA, the attention
gate kind, SmearGate, U-Net skips, loop count and range (moved inside the smaller stack), parallel residuals,
Newton-Schulz coefficients, LR floor, EMA, LQER mode, bit widths, compressor, byte accounting, TTT mode (LoRA /
phased / chunked, bigram hash) and pre-quant TTT. The whole pipeline then runs in this process through
:func:`pgolf.artifact.record_run.run_record` on real text from data/sample/docs.jsonl, tokenized by a tiny tokenizer
trained here (CaseOps with its byte sidecar, or plain with lookup-table byte accounting).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import code_identities
import numpy as np
import pytest
import torch
import yaml

from pgolf.compliance.comply import FAIL, check_run
from pgolf.config import RunConfig, load_run_config, parse_run_config, to_dict
from pgolf.data.shards import BOS_ID, ShardStreamWriter
from pgolf.data.tokenizer import iter_jsonl_texts, load_tokenizer, train_tokenizer
from pgolf.artifact.record_run import run_record

torch.set_num_threads(1)  # tiny matmuls: thread hand-off costs more than it saves on a shared 2-core machine

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DOCS = ROOT / "data" / "sample" / "docs.jsonl"
RECIPES = ("config.yaml", "recipes/pr1530.yaml", "recipes/pr1572.yaml", "recipes/pr1523.yaml",
           "recipes/pr1487.yaml", "recipes/pr1787.yaml")
SEED = 3
VOCAB = 320  # above the 264 reserved pieces of a CaseOps tokenizer (special + operators + bytes)
TRAIN_DOCS, VAL_DOCS, MAX_EVAL_DOCS = 120, 14, 12
SHARD_TOKENS = 6000  # several train shards
VAL_DOC_CHARS = 120

# The stand-in for train_gpt.py that the size gate counts (minified under the "wrapper" convention).
CODE_FILE_TEXT = '''"""Stand-in training script counted by the size gate."""


def main(argv=None):
    # a comment the minifier drops
    return 0


if __name__ == "__main__":
    main()
'''


# --------------------------------------------------------------------------------------------------------------
# Shrinking a recipe: sizes only
# --------------------------------------------------------------------------------------------------------------


def _scale_layer(index: int, old_layers: int, new_layers: int) -> int:
    """A layer index of the full stack mapped into the small one (same relative depth), kept in range."""
    return min(new_layers - 1, max(0, round(index * new_layers / old_layers)))


def shrink_model(model: dict) -> dict:
    old_layers, new_layers = model["num_layers"], 5
    small = dict(model, vocab_size=VOCAB, num_layers=new_layers, model_dim=32)
    # 4 heads of width 8; the kv heads keep the recipe's query/kv ratio (GQA stays GQA)
    ratio = model["num_heads"] // model["num_kv_heads"]
    small["num_heads"] = 4
    small["num_kv_heads"] = max(1, 4 // ratio)
    head_dim = small["model_dim"] // small["num_heads"]
    if model["rope_dims"]:
        small["rope_dims"] = min(head_dim, 4)  # partial RoPE stays partial (4 of 8)
    xsa = model["xsa_last_n"]
    if xsa >= old_layers:  # XSA on every layer stays on every layer
        small["xsa_last_n"] = new_layers
    else:  # a few last layers stay a few (at least one when on)
        small["xsa_last_n"] = min(new_layers, max(1 if xsa else 0, round(xsa * new_layers / old_layers)))
    # the recurrent range keeps its position and stays at least 2 layers wide, inside the small stack
    start = _scale_layer(model["loop_start"], old_layers, new_layers)
    end = max(start + 1, _scale_layer(model["loop_end"], old_layers, new_layers))
    if end >= new_layers:
        start, end = new_layers - 2, new_layers - 1
    small["loop_start"], small["loop_end"] = start, end
    if model["parallel_residual_start"] >= 0:  # clamped into the small stack
        small["parallel_residual_start"] = _scale_layer(model["parallel_residual_start"], old_layers, new_layers)
    small["attn_gate_window"] = min(model["attn_gate_window"], small["model_dim"])
    small["smear_gate_window"] = min(model["smear_gate_window"], small["model_dim"])
    return small


def shrink_ttt(ttt: dict) -> dict:
    small = dict(ttt, lora_rank=4, chunk_tokens=min(ttt["chunk_tokens"], 16), docs_per_batch=4, context_tokens=32,
                 slot_lengths=[], phase_chunk_tokens=48, stream_chunk_tokens=40)
    if ttt["phase_boundaries_docs"]:  # as many phases, over the few documents scored
        small["phase_boundaries_docs"] = [3 * (i + 1) for i in range(len(ttt["phase_boundaries_docs"]))]
        # one lane, nothing in flight: with 8 lanes the 3 batches would all be claimed before a phase point
        small.update(lanes=1, inflight=0, side_batches=False, phase_rows=1)
    if ttt["bigram_hash_buckets"]:
        small["bigram_hash_buckets"] = 64
        small["bigram_hash_dim"] = 16 if ttt["bigram_hash_dim"] else 0
    return small


def shrink(cfg: RunConfig) -> RunConfig:
    """The same recipe at toy sizes (see the module docstring); a labelled sweep, since val_docs is tiny."""
    d = to_dict(cfg)
    d["mode"] = "sweep"  # record mode requires the 50,000 official validation documents
    d["seeds"] = [SEED]
    d["data"]["val_docs"] = VAL_DOCS
    d["data"]["shard_tokens"] = SHARD_TOKENS
    d["tokenizer"]["vocab_size"] = VOCAB
    d["model"] = shrink_model(d["model"])
    d["train"].update(train_batch_tokens=512, micro_batch_tokens=256, train_seq_len=64, max_wallclock_seconds=0.0,
                      reserve_seconds=0.0, iterations=3, warmup_steps=1, compile=False,
                      log_every_steps=1, warmup_cu_passes=min(d["train"]["warmup_cu_passes"], 1))
    if d["train"]["prequant_ttt_epochs"] > 0:
        d["train"]["prequant_ttt_epochs"] = 1
    d["hessians"].update(batches=2, batch_rows=2, seq_len=32)
    d["quantize"].update(passthrough_max_elements=256, gptq_block_size=16, lqer_rank=2, lqer_group_size=16,
                         lqer_top_k=min(d["quantize"]["lqer_top_k"], 2))
    d["pack"]["brotli_quality"] = 1
    ev = d["evaluate"]
    ev.update(eval_seq_len=32, eval_batch_tokens=128, diagnostics=False, compile=False, compile_warmup_steps=0,
              max_docs=MAX_EVAL_DOCS, progress_every_seconds=1e9)
    ev["ttt"] = shrink_ttt(ev["ttt"])
    return parse_run_config(d, f"{cfg.run} (shrunk)")


def feature_switches(cfg: RunConfig) -> dict:
    """What must survive the shrink unchanged."""
    m, t, q, ttt = cfg.model, cfg.train, cfg.quantize, cfg.evaluate.ttt
    return {
        "model": (m.tie_embeddings, m.logit_softcap, m.qk_norm, m.rope_dims > 0, m.xsa_last_n > 0, m.attn_gate,
                  m.smear_gate, m.smear_bos_mask, m.unet_skips, m.skip_gates, m.loop_count,
                  m.parallel_residual_start >= 0, m.mlp_activation, m.q_gain_init, m.num_heads > m.num_kv_heads),
        "optim": to_dict(cfg.optim),
        "train": (t.min_lr_fraction, t.ema_decay, t.loop_enable_fraction, t.warmdown_fraction, t.grad_clip_norm,
                  t.prequant_ttt_epochs > 0),
        "quantize": (q.attn_bits, q.mlp_bits, q.embed_bits, q.gate_bits, q.lqer_mode, q.act_order),
        "pack": (cfg.pack.compressor, cfg.pack.code_bytes_convention, cfg.pack.byte_shuffle),
        "evaluate": (cfg.evaluate.byte_accounting, ttt.mode, ttt.optimizer, ttt.warm_start_a, tuple(ttt.lora_targets),
                     bool(ttt.phase_boundaries_docs), ttt.phase_scope, ttt.bigram_hash_buckets > 0,
                     ttt.chunk_epochs, ttt.debug_update_before_score),
    }


# --------------------------------------------------------------------------------------------------------------
# Data: real text, a tiny tokenizer, shards (and the CaseOps byte sidecar)
# --------------------------------------------------------------------------------------------------------------


def write_corpus(directory: Path, caseops: bool) -> tuple[Path, Path]:
    """Train a VOCAB-piece tokenizer on the training documents; write train and val shards (+ sidecar)."""
    texts = list(iter_jsonl_texts(SAMPLE_DOCS, limit=TRAIN_DOCS + VAL_DOCS))
    if not caseops:  # a plain tokenizer needs every character as a piece: a small alphabet leaves room for merges
        texts = [re.sub(r"[^a-z0-9 .,\n]", "", text.lower()) for text in texts]
    # short validation documents keep CPU TTT (one step per chunk) quick
    val_texts, train_texts = [t[:VAL_DOC_CHARS] for t in texts[:VAL_DOCS]], texts[VAL_DOCS:]
    tokenizer_path = train_tokenizer(train_texts, directory / "tokenizer.model", VOCAB, caseops=caseops,
                                     num_threads=1)
    tokenizer = load_tokenizer(tokenizer_path, caseops)
    data_dir = directory / "data"
    data_dir.mkdir(parents=True)

    def docs(kind: str, doc_texts: list[str]) -> None:
        encoded = tokenizer.encode_documents(doc_texts)
        with ShardStreamWriter(data_dir, kind, SHARD_TOKENS) as tokens:
            for ids, _ in encoded:
                tokens.append(np.concatenate([[BOS_ID], ids]).astype(np.uint16))
        if kind == "val" and caseops:  # original UTF-8 bytes per token; BOS counts none
            with ShardStreamWriter(data_dir, "val_bytes", SHARD_TOKENS) as sidecar:
                for _, counts in encoded:
                    sidecar.append(np.concatenate([[0], counts]).astype(np.uint16))

    docs("train", train_texts)
    docs("val", val_texts)
    return data_dir, tokenizer_path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Callable[[bool], tuple[Path, Path]]:
    """One corpus per tokenizer kind, built on first use and shared by every recipe of that kind."""
    root = tmp_path_factory.mktemp("corpora")
    built: dict[bool, tuple[Path, Path]] = {}

    def get(caseops: bool) -> tuple[Path, Path]:
        if caseops not in built:
            built[caseops] = write_corpus(root / ("caseops" if caseops else "plain"), caseops)
        return built[caseops]

    return get


@pytest.fixture(scope="module")
def code_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("code") / "train_gpt.py"
    path.write_text(CODE_FILE_TEXT, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# The recipes' code identities, computed beside the runs
# --------------------------------------------------------------------------------------------------------------


def _runs(cfg: RunConfig) -> bool:
    return not (cfg.pack.compressor == "lrzip" and shutil.which("lrzip") is None)


@pytest.fixture(scope="module")
def code_identity_procs(request, tmp_path_factory) -> dict[str, subprocess.Popen]:
    """{recipe: the process computing its code identity}. run_record records the recipe's code identity: seconds
    of shrinking per recipe, three quarters of this module's time when each run computed its own. Two processes
    (tests/code_identities.py) compute the selected recipes' identities, in the runs' order, while this process
    trains and evaluates on one thread (~46 s -> ~27 s for the module on CI's two cores)."""
    recipes = [item.callspec.params["recipe"] for item in request.session.items
               if getattr(item, "originalname", None) == "test_recipe_runs_end_to_end"]
    recipes = [r for r in dict.fromkeys(recipes) if _runs(shrink(load_run_config(ROOT / r)))]
    folder = tmp_path_factory.mktemp("code_identities")
    files = {}
    for i, recipe in enumerate(recipes):
        files[recipe] = folder / f"recipe{i}.yaml"
        files[recipe].write_text(yaml.safe_dump(to_dict(shrink(load_run_config(ROOT / recipe)))), encoding="utf-8")
    procs = {}
    for i, half in enumerate((recipes[0::2], recipes[1::2])):
        proc = code_identities.start([files[r] for r in half], folder / f"log{i}.txt")
        procs.update(dict.fromkeys(half, proc))
    yield procs
    for proc in set(procs.values()):
        code_identities.stop(proc)


# --------------------------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------------------------


def test_shrink_keeps_every_feature_switch() -> None:
    for recipe in RECIPES:
        full = load_run_config(ROOT / recipe)
        small = shrink(full)
        assert feature_switches(small) == feature_switches(full), recipe
        m = small.model
        assert m.num_layers <= 5 and m.model_dim <= 64 and m.vocab_size == VOCAB, recipe
        if m.loop_count > 1:
            assert 0 <= m.loop_start < m.loop_end < m.num_layers, recipe


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_end_to_end(recipe: str, corpora, code_file: Path, code_identity_procs, tmp_path: Path) -> None:
    cfg = shrink(load_run_config(ROOT / recipe))
    if not _runs(cfg):
        pytest.skip(f"{recipe}: compressor lrzip, but the lrzip binary is not installed")
    data_dir, tokenizer_path = corpora(cfg.tokenizer.caseops)
    code_identities.wait_for(cfg, code_identity_procs.get(recipe))  # it reads what the process computed
    out = tmp_path / "run" / f"seed{SEED}"
    summary = run_record(cfg, SEED, data_dir, out, tokenizer_path=tokenizer_path, code_file=code_file,
                         device_kind="cpu")

    assert summary["exit_status"] == 0, summary
    assert set(summary["stages"]) == {"train", "hessians", "quantize", "pack", "evaluate"}
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert math.isfinite(result["val_bpb"]) and result["val_bpb"] > 0
    ledger = result["ledger"]
    assert ledger["complete"] is True and ledger["complete_checked"] is True
    assert result["token_count"] == ledger["targets_expected"] > 0  # every target scored exactly once
    assert result["doc_count"] == MAX_EVAL_DOCS
    assert result["byte_accounting"] == ("sidecar" if cfg.tokenizer.caseops else "lut")
    assert result["model_config"] == to_dict(cfg.model)  # the artifact's model is the recipe's, shrunk
    ttt = cfg.evaluate.ttt
    assert result["ttt"]["mode"] == ttt.mode
    if ttt.mode != "none":
        assert ledger["updates"] > 0  # TTT really trained (after scoring)
    if ttt.mode == "lora":
        assert bool(result["ttt"]["phases"]) == bool(ttt.phase_boundaries_docs)  # phased global passes ran
    if ttt.mode == "chunked":
        assert result["ttt"]["bigram_hash_buckets"] == ttt.bigram_hash_buckets

    quantized = json.loads((out / "quantize" / "quantize_report.json").read_text())
    assert bool(quantized["totals"]["lqer_applied"]) == (cfg.quantize.lqer_mode != "off")
    packed = json.loads((out / "pack" / "pack_report.json").read_text())
    assert packed["ok"] and packed["compressor"] == cfg.pack.compressor

    meta = json.loads((out / "train" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["steps"] == cfg.train.iterations
    verdicts = {v.rule: v for v in check_run(tmp_path / "run", cfg, data_dir)}
    if cfg.train.prequant_ttt_epochs > 0:
        assert meta["prequant_ttt_val_tokens"] > 0
        assert verdicts["no_prequant_ttt"].status == FAIL
    else:
        assert not meta.get("prequant_ttt_val_tokens")
        assert verdicts["no_prequant_ttt"].status != FAIL
    assert verdicts["ttt_ledger"].status != FAIL, verdicts["ttt_ledger"]
