"""pgolf's record recipe against PR #1855's own ``train_gpt.py``: forward pass, metric, import, precision.

The record script is the oracle (imported by tests/record_oracle.py; skipped with the path when absent). CPU,
float32, random weights everywhere (tests/oracle_model.py). Tolerances: float32 logits of magnitude ~25 agree to
about 1e-5 (measured worst 1.0e-5 abs / 5.4e-7 rel), so 1e-4 abs AND 1e-5 rel; the smallest put-back difference
(the RoPE frequencies unrounded) is 4e-3. Metric: counts exact, loss 1e-6 relative, bpb 1e-6 absolute.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oracle_model as om
from record_oracle import load_or_skip
from pgolf.cli import main as cli_main
from pgolf.config import ConfigError, EvaluateConfig, TTTConfig, load_run_config, to_dict
from pgolf.data.shards import ShardStreamWriter
from pgolf.model.rope import extend_rope_cache, token_rope

ATOL, RTOL = 1e-4, 1e-5
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rec():
    torch.set_num_threads(1)
    return load_or_skip()


# ---------------------------------------------------------------------------------------------- forward pass


@pytest.mark.parametrize("looping", [False, True], ids=["loop_off", "loop_on"])
@pytest.mark.parametrize("name", list(om.CONFIGS))
def test_logits_equal_the_record(rec, name, looping):
    """Two packed rows of 160 and 200 tokens (3-6 documents each; the second starts mid-document; documents
    cut every 32 tokens from their BOS), the record's own cu_seqlens, weights copied by the name map."""
    h = om.hparams(rec, **om.CONFIGS[name])
    model = om.record_model(rec, h)
    stream = om.synthetic_stream(40, h.vocab_size, seed=11)
    worst_abs, worst_rel, docs = om.compare_logits(rec, model, om.pgolf_twin(model, h), stream, ((0, 160), (37, 200)),
                                                   h.eval_seq_len, looping)
    assert min(docs) >= 2, "every row must hold several documents"
    assert worst_abs < ATOL and worst_rel < RTOL, (worst_abs, worst_rel)


def test_the_discarded_lane_corner_is_refused(rec):
    """Loop 1-3 x3 with lanes from 3: the record runs decoder applications of layers 1 and 2 single-lane after
    the split, on a state it then discards. pgolf refuses the configuration instead of reproducing that."""
    h = om.hparams(rec, **om.REFUSED_CORNER)
    om.record_model(rec, h)  # the record builds it
    with pytest.raises(ConfigError, match="would be discarded"):
        om.pgolf_config(h)


def test_logits_equal_on_2048_token_windows(rec):
    """One 4,096-token row, documents of 1,500 and 2,596 tokens (the second cut at 2,048): long windows show the
    bf16-rounded RoPE frequencies (0.37 rad at distance 2048 otherwise), and the row length is a multiple of
    max_seqlen (where a dense attention shim would cross documents)."""
    h = om.hparams(rec, num_layers=2, num_loops=0, parallel_start_layer=1, xsa_last_n=2, eval_seq_len=2048)
    model = om.record_model(rec, h)
    stream = np.random.default_rng(0).integers(2, h.vocab_size, 4096)
    stream[[0, 1500]] = om.BOS
    worst_abs, worst_rel, _ = om.compare_logits(rec, model, om.pgolf_twin(model, h), stream, ((0, 4096),), 2048, False)
    assert worst_abs < ATOL and worst_rel < RTOL, (worst_abs, worst_rel)


def test_rope_angles_are_the_records_row_positions(rec):
    """The record rotates by a token's index in its packed ROW (0..98,303 over a training micro-batch of one
    [1, 98,304] row), not in its document; at such positions the fp32 angles round, so the two differ by more than
    noise. pgolf's record recipe (``model.rope_positions: row``) gives the record's cos/sin bit for bit."""
    h = om.hparams(rec, num_layers=2, num_loops=0, parallel_start_layer=1, xsa_last_n=2)
    model = om.record_model(rec, h)
    T = 98_304
    cu = torch.tensor([0, 30_000, 70_001, T], dtype=torch.int32)  # three documents in the row
    record_cos, record_sin = (t[0, :, 0, :] for t in model.blocks[0].attn.rotary(T, torch.device("cpu"), torch.float32))
    twin = om.pgolf_twin(model, h)
    tables = (twin.rope_inv_freq, twin.rope_cos, twin.rope_sin)
    cos, sin = token_rope(twin.cfg.rope_positions, cu, T, 40_000, *tables)
    assert torch.equal(cos[:, 0], record_cos) and torch.equal(sin[:, 0], record_sin)
    extend_rope_cache(twin, T)  # as training does before compiling: the same values, sliced from the cache
    assert twin.rope_cos.shape[0] == T and not twin.rope_cos.is_inference()
    cached = token_rope("row", cu, T, 40_000, twin.rope_inv_freq, twin.rope_cos, twin.rope_sin)
    assert torch.equal(cached[0][:, 0], record_cos) and torch.equal(cached[1][:, 0], record_sin)
    seg_cos, _ = token_rope("segment", cu, T, 40_000, *tables)  # pgolf's option: positions restart per document
    assert torch.equal(seg_cos[30_000, 0], record_cos[0]) and not torch.equal(seg_cos[:, 0], record_cos)


@pytest.mark.parametrize("rope_dims,model_dim,heads", [(8, 64, 4), (16, 128, 2), (0, 64, 4)])
def test_rope_frequencies_are_the_records(rec, rope_dims, model_dim, heads):
    h = om.hparams(rec, rope_dims=rope_dims, model_dim=model_dim, num_heads=heads, num_kv_heads=1)
    record_freq = om.record_model(rec, h).blocks[0].attn.rotary.inv_freq.float()
    assert torch.equal(om.pgolf_twin(om.record_model(rec, h), h).rope_inv_freq, record_freq)


def test_weight_map_is_complete_and_invertible(rec):
    from pgolf.model.gpt import GPT

    for over in om.CONFIGS.values():
        h = om.hparams(rec, **over)
        sd = om.record_model(rec, h).state_dict()
        cfg = om.pgolf_config(h)
        lanes = cfg.parallel_residual_start >= 0
        mapped = om.to_pgolf_state(sd, h.num_layers, lanes)
        model = GPT(cfg)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in mapped.items()}
        unused = 0 if lanes else sd["parallel_post_lambdas"].numel() + sd["parallel_resid_lambdas"].numel()
        assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in sd.values()) - unused
        if lanes:
            back = om.to_record_state(mapped, h.num_layers)
            assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------- the metric


def _val_dir(directory: Path, h, seed: int, num_docs: int = 60) -> tuple[Path, np.ndarray, np.ndarray]:
    """Val shards and byte sidecar in the record's shard format (both sides read the same files); bytes 1-4 per
    token, 0 at every BOS. The stream does not end on a whole window, so truncation matters."""
    tokens = om.synthetic_stream(num_docs, h.vocab_size, seed, max_len=70)
    if (len(tokens) - 1) % h.eval_seq_len == 0:
        tokens = np.append(tokens, 5)
    byte_counts = np.random.default_rng(seed + 1).integers(1, 5, size=len(tokens))
    byte_counts[tokens == om.BOS] = 0
    directory.mkdir(parents=True, exist_ok=True)
    with ShardStreamWriter(directory, "val", 997) as w:
        w.append(tokens.astype(np.uint16))
    with ShardStreamWriter(directory, "val_bytes", 997) as w:
        w.append(byte_counts.astype(np.uint16))
    return directory, tokens, byte_counts


def _record_val_data(rec, directory: Path, h):
    """The record's own loaders on the shard directory (ValidationData with CaseOps: tokens + sidecar)."""
    tokens = rec.load_validation_tokens(str(directory / "fineweb_val_0*.bin"), h.eval_seq_len)
    sidecar = rec.load_validation_byte_sidecar(str(directory / "fineweb_val_bytes_*.bin"), h.eval_seq_len, tokens.numel())
    return om.record_val_data(tokens.numpy(), sidecar.numpy(), h.eval_seq_len)


def _metric_config(h, **changes) -> EvaluateConfig:
    values = dict(eval_seq_len=h.eval_seq_len, eval_batch_tokens=4 * h.eval_seq_len, compile=False, diagnostics=False,
                  progress_every_seconds=1e9, stream_truncation="record", score_next_bos=True,
                  diagnostic_scoring="record_flat", softcap_dtype="model", param_storage="record",
                  ttt=TTTConfig(mode="none"))  # the TTT path's target set is issue 15 item 6
    values.update(changes)
    return EvaluateConfig(**values)


@pytest.mark.parametrize("world_size,batch_seqs", [(1, 2), (2, 3)])
def test_eval_val_equals_the_records(rec, tmp_path, world_size, batch_seqs):
    """The record's own eval_val (every rank's sums) and pgolf's record_flat diagnostic, each reading the same
    shards with its own loader: the same targets and bytes, the same loss."""
    from pgolf.evaluate.stage import score_diagnostic, validation_for

    h = om.hparams(rec)
    model = om.record_model(rec, h)
    model.looping_active = True  # as after the record's deserialize
    directory, _, _ = _val_dir(tmp_path, h, seed=3)
    loss_sum, tokens, nbytes = om.record_eval_val(rec, h, _record_val_data(rec, directory, h), model, world_size, batch_seqs)
    cfg = _metric_config(h, record_flat_world_size=world_size, record_flat_batch_seqs=batch_seqs)
    val = validation_for(cfg, directory)
    mine = score_diagnostic(om.pgolf_twin(model, h), val, cfg)
    assert (mine.token_count, mine.byte_sum) == (tokens, nbytes)
    assert abs(mine.loss_sum - loss_sum) / loss_sum < 1e-6
    record_bpb = loss_sum / (np.log(2.0) * nbytes)
    assert abs(mine.val_bpb - record_bpb) < 1e-6, (mine.val_bpb, record_bpb)
    # pgolf's own per-document scoring is a different number on the same model (the option matters)
    documents = score_diagnostic(om.pgolf_twin(model, h), val, dataclasses.replace(cfg, diagnostic_scoring="documents"))
    assert abs(documents.val_bpb - record_bpb) > 1e-3


def test_stream_truncated_like_the_record(rec, tmp_path):
    from pgolf.evaluate.stage import validation_for

    h = om.hparams(rec)
    directory, tokens, _ = _val_dir(tmp_path, h, seed=5)
    record = _record_val_data(rec, directory, h)
    val = validation_for(_metric_config(h), directory)
    assert val.num_positions == record.val_tokens.numel() < len(tokens)
    np.testing.assert_array_equal(val.tokens, record.val_tokens.numpy())
    np.testing.assert_array_equal(val.target_bytes, record.val_bytes.numpy())


def test_targets_are_the_records_documents(rec, tmp_path):
    """The record's phased-TTT documents (_find_docs: the official number's target set): document d predicts
    positions start + 1 .. start + len - 1, the next BOS included; pgolf's score_ends give the same ranges, and
    every position but the first is a target exactly once."""
    from pgolf.evaluate.stage import validation_for

    h = om.hparams(rec)
    directory, _, _ = _val_dir(tmp_path, h, seed=7)
    val = validation_for(_metric_config(h), directory)
    docs = rec._find_docs(torch.from_numpy(val.tokens.astype(np.int64)))
    assert [(s, n) for s, n in docs] == list(zip(val.doc_starts.tolist(), (val.score_ends - val.doc_starts).tolist()))
    covered = np.zeros(val.num_positions, dtype=np.int64)
    for start, length in docs:
        covered[start + 1 : start + length] += 1
    np.testing.assert_array_equal(covered.astype(bool), val.target_mask())
    assert covered.max() == 1 and val.target_count == val.num_positions - 1
    assert (val.target_bytes[val.doc_starts] == 0).all()  # a BOS target weighs 0 bytes


# ---------------------------------------------------------------------------------------------- import-record


def _saved_record_model(rec, h, tmp_path: Path):
    """A tiny record model saved by the record's own serialize, and its log."""
    model = om.record_model(rec, h, fp32=False)  # the bf16 embedding stays bf16, as in final_model.pt
    om.save_final_model_the_records_way(rec, h, model, tmp_path / "final_model.pt")
    om.write_hparams_log(h, tmp_path / "train.log", "stopping_early: wallclock_cap train_time: 599592ms step: 4945/20000\n")
    return model


def test_final_model_holds_a_bf16_embedding_only(rec, tmp_path):
    _saved_record_model(rec, om.hparams(rec), tmp_path)
    sd = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert {k: v.dtype for k, v in sd.items() if v.dtype != torch.float32} == {"tok_emb.weight": torch.bfloat16}


@pytest.mark.parametrize("name", ["tiny", "untied_dense_gate_no_smear_full_rope_no_xsa_no_lanes_no_loops"])
def test_import_record_final_model(rec, tmp_path, name):
    from pgolf.evaluate.stage import load_model_from_checkpoint
    from pgolf.train.checkpoint import load_checkpoint

    h = om.hparams(rec, **om.CONFIGS[name])
    model = _saved_record_model(rec, h, tmp_path)
    argv = ["checkpoint", "import-record", str(tmp_path / "final_model.pt"), "--out", str(tmp_path / "ckpt"),
            "--log", str(tmp_path / "train.log")]
    assert cli_main(argv) == 0
    state, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["model_config"] == to_dict(om.pgolf_config(h))  # the library's config map = the test's
    assert meta["weights"] == "record_final" and meta["param_storage"] == "record"
    assert meta["source"]["dtypes"]["tok_emb.weight"] == "bfloat16" and meta["train_seconds"] == 599.592
    assert all(t.dtype == torch.float32 for t in state.values())
    loaded, _ = load_model_from_checkpoint(tmp_path / "ckpt", param_storage="record")
    loaded.use_fused_kernels, loaded.attn_backend = False, "sdpa"
    stream = om.synthetic_stream(40, h.vocab_size, seed=11)
    for looping in (False, True):
        worst, _, _ = om.compare_logits(rec, model.float(), loaded, stream, ((0, 160), (37, 200)), h.eval_seq_len, looping)
        assert worst < ATOL, (looping, worst)
    assert cli_main(argv) == 2  # an existing checkpoint is not replaced without --force
    assert cli_main([*argv, "--force"]) == 0


def test_the_record_runs_log_gives_the_record_recipe(rec):
    """The published record log's Hyperparameters block maps to exactly config.yaml's model section."""
    from pgolf.train.record_import import config_from_hparams, parse_hparams_log
    from record_oracle import record_script

    log = record_script().parent / "train_seed42.log"
    if not log.is_file():
        pytest.skip(f"{log} not found")
    assert config_from_hparams(parse_hparams_log(log)) == load_run_config(REPO / "config.yaml").model


@pytest.mark.parametrize("change,message", [
    (dict(num_heads=8), "num_heads"),
    (dict(smear_gate_enabled=False), "smear"),
    (dict(num_loops=1), "skip_weights"),
    (dict(attn_out_gate_enabled=True), "attn_out_gate_enabled: True has no pgolf equivalent"),
    (dict(rope_yarn=True), "rope_yarn"),
])
def test_import_record_refuses(rec, tmp_path, capsys, change, message):
    h = om.hparams(rec)
    _saved_record_model(rec, h, tmp_path)
    for key, value in change.items():
        setattr(h, key, value)
    om.write_hparams_log(h, tmp_path / "wrong.log")
    argv = ["checkpoint", "import-record", str(tmp_path / "final_model.pt"), "--out", str(tmp_path / "ckpt")]
    assert cli_main([*argv, "--log", str(tmp_path / "wrong.log")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "ckpt" / "checkpoint.json").exists()


def test_import_record_needs_the_architecture(rec, tmp_path, capsys):
    """Without a log a recipe must say what the shapes cannot: config.yaml's 11 x 512 model is not these weights;
    a recipe with the right model section is taken (and named in the metadata)."""
    import yaml

    from pgolf.train.checkpoint import read_checkpoint_meta

    h = om.hparams(rec, vocab_size=300)  # a recipe's tokenizer has >= 264 pieces
    _saved_record_model(rec, h, tmp_path)
    argv = ["checkpoint", "import-record", str(tmp_path / "final_model.pt"), "--out", str(tmp_path / "ckpt")]
    with pytest.raises(SystemExit):
        cli_main(argv)  # one of --log / --config is required
    assert cli_main([*argv, "--config", str(REPO / "config.yaml")]) == 2
    assert "the weights do not fit the model config: vocab_size (weights: 300, config: 8192)" in capsys.readouterr().err
    recipe = {"run": "tiny", "mode": "sweep", "model": to_dict(om.pgolf_config(h)), "tokenizer": {"vocab_size": 300}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_main([*argv, "--config", str(tmp_path / "tiny.yaml")]) == 0
    meta = read_checkpoint_meta(tmp_path / "ckpt")
    assert meta["model_config"] == recipe["model"] and meta["source"]["model_config_from"].startswith("recipe ")


def test_import_record_initial_weights(rec, tmp_path):
    """The state a record run starts from (seeded GPT(h), .bfloat16() + restore_fp32_params), imported with
    --kind initial: the same values bit for bit, and `pgolf train --init-checkpoint` starts from them."""
    from pgolf.config import OptimConfig
    from pgolf.model.gpt import GPT
    from pgolf.train.checkpoint import load_checkpoint, load_initial_weights, read_checkpoint_meta
    from pgolf.train.loop import train
    from stage_fixtures import TINY_TRAIN, write_shards

    h = om.hparams(rec)
    torch.manual_seed(42)
    initial = rec.GPT(h).bfloat16()
    rec.restore_fp32_params(initial)
    sd = initial.state_dict()
    torch.save(sd, tmp_path / "initial_model.pt")
    om.write_hparams_log(h, tmp_path / "train.log")
    assert cli_main(["checkpoint", "import-record", str(tmp_path / "initial_model.pt"), "--out", str(tmp_path / "ckpt"),
                     "--log", str(tmp_path / "train.log"), "--kind", "initial"]) == 0
    state, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["weights"] == "record_initial" and meta["param_storage"] == "record"
    back = om.to_record_state(state, h.num_layers)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k].float()) for k in sd)
    cfg = om.pgolf_config(h)
    model = GPT(cfg)
    load_initial_weights(model, cfg, tmp_path / "ckpt")  # what `pgolf train --init-checkpoint` does first
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # and the training stage starts from it (one step, the record's storage)
    data = write_shards(tmp_path / "shards", vocab=h.vocab_size)
    train_cfg = dataclasses.replace(TINY_TRAIN, train_seq_len=32, iterations=1, param_storage="record")
    train(cfg, OptimConfig(), train_cfg, 0, data, tmp_path / "train", "cpu", init_checkpoint=tmp_path / "ckpt")
    trained = read_checkpoint_meta(tmp_path / "train" / "checkpoint")
    assert trained["init_checkpoint"] == str(tmp_path / "ckpt") and trained["param_storage"] == "record"


def test_imported_checkpoint_runs_every_later_stage(rec, tmp_path):
    """import-record -> Hessians -> quantize -> pack -> evaluate (the record's metric options), by the CLI."""
    from pgolf.config import HessianConfig, PackConfig, QuantizeConfig
    from pgolf.data.shards import read_shard, write_shard
    from stage_fixtures import write_shards

    h = om.hparams(rec)
    _saved_record_model(rec, h, tmp_path)
    data = write_shards(tmp_path / "shards", vocab=h.vocab_size)
    val = read_shard(data / "fineweb_val_000000.bin")
    write_shard(data / "fineweb_val_bytes_000000.bin", np.where(val == om.BOS, 0, 1 + val % 3).astype(np.uint16))
    ckpt = tmp_path / "ckpt"
    assert cli_main(["checkpoint", "import-record", str(tmp_path / "final_model.pt"), "--out", str(ckpt),
                     "--log", str(tmp_path / "train.log")]) == 0
    assert cli_main(["hessians", "--checkpoint", str(ckpt), "--data-dir", str(data), "--seed", "1", "--mode", "sweep",
                     "--hessian-json", json.dumps(to_dict(HessianConfig(batches=1, batch_rows=2, seq_len=32))),
                     "--device", "cpu", "--out", str(tmp_path / "h.pt"), "--report", str(tmp_path / "hr.json")]) == 0
    qcfg = QuantizeConfig(passthrough_max_elements=1024, lqer_top_k=1, lqer_rank=2, lqer_group_size=16)
    assert cli_main(["quantize", "--checkpoint", str(ckpt), "--hessians", str(tmp_path / "h.pt"), "--quantize-json",
                     json.dumps(to_dict(qcfg)), "--out", str(tmp_path / "q.pt"), "--report", str(tmp_path / "qr.json")]) == 0
    (tmp_path / "train_gpt.py").write_text("print('stand-in')\n")
    pack = tmp_path / "pack"
    assert cli_main(["pack", "build", "--quantized", str(tmp_path / "q.pt"), "--checkpoint", str(ckpt), "--pack-json",
                     json.dumps(to_dict(PackConfig())), "--code", str(tmp_path / "train_gpt.py"), "--out",
                     str(pack / "artifact.pgolf"), "--report", str(pack / "pack_report.json")]) == 0
    cfg = _metric_config(h, diagnostics=True, record_flat_world_size=1, record_flat_batch_seqs=1)
    assert cli_main(["evaluate", "--artifact", str(pack / "artifact.pgolf"), "--eval-json", json.dumps(to_dict(cfg)),
                     "--seed", "1", "--data-dir", str(data), "--out", str(tmp_path / "eval.json"), "--mode", "sweep",
                     "--device", "cpu", "--checkpoint", str(ckpt)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["ledger"]["complete"] and report["diagnostics"]["pre_quant"]["val_bpb"] > 0


# ---------------------------------------------------------------------------------------------- precision


def test_evaluated_embedding_is_rounded_as_the_records(rec, tmp_path):
    """The record evaluates a bf16 template into which it loads the dequantized weights (W.to(orig_dtype)):
    only the embedding is rounded. pgolf's param_storage 'record' gives the same values after the artifact load."""
    from eval_fixtures import write_artifact
    from pgolf.evaluate.stage import load_model_from_artifact

    h = om.hparams(rec)
    pg = om.pgolf_twin(om.record_model(rec, h), h)
    artifact = write_artifact(tmp_path, pg)
    plain = load_model_from_artifact(artifact)[0].state_dict()
    mine = load_model_from_artifact(artifact, param_storage="record")[0].state_dict()
    template = rec.GPT(h).bfloat16()
    rec.restore_fp32_params(template)
    template.load_state_dict(om.to_record_state(plain, h.num_layers), strict=True)  # copies into the template's dtypes
    theirs = om.to_pgolf_state({k: v.float() for k, v in template.state_dict().items()}, h.num_layers, True)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not torch.equal(mine["tok_emb.weight"], plain["tok_emb.weight"])


@pytest.mark.parametrize("softcap_dtype", ["model", "float32"])
def test_softcap_dtype_under_autocast(rec, softcap_dtype):
    """Under bf16 autocast the record's forward_logits softcaps the bf16 head output; pgolf's token_nll does the
    same with softcap_dtype 'model' (bitwise on the same hidden states), not with 'float32'."""
    from pgolf.evaluate.scoring import token_nll

    h = om.hparams(rec)
    model = om.record_model(rec, h)
    pg = om.pgolf_twin(model, h)
    stream = om.synthetic_stream(10, h.vocab_size, seed=2)
    ids, cu, max_seqlen = om.record_row(rec, stream, 0, 120, h.eval_seq_len)
    targets = torch.from_numpy(stream[1:121].copy())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = pg.forward_hidden(ids, cu, max_seqlen)
        model._forward_hidden = lambda *args, **kwargs: hidden[None]  # the record's head and softcap on pgolf's states
        try:
            record_logits = model.forward_logits(ids[None], cu_seqlens=cu, max_seqlen=max_seqlen)[0]
        finally:
            del model._forward_hidden
        record_nll = F.cross_entropy(record_logits.float(), targets, reduction="none")
        mine = token_nll(pg, ids, targets, cu, max_seqlen, softcap_dtype=softcap_dtype)
    assert record_logits.dtype == torch.bfloat16
    assert torch.equal(mine, record_nll) == (softcap_dtype == "model")


# ------------------------------------------------------------------------------------- XSA's precision


def _xsa_inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(5)
    y = torch.randn(40, 8, 64, generator=g).bfloat16().to(device)  # [T, H, D], attention output
    v = torch.randn(40, 4, 64, generator=g).bfloat16().to(device)  # [T, Hkv, D]
    return y, v


def test_xsa_follows_the_records_cuda_autocast_dtypes(rec):
    """On the GPU the record's ``_xsa_efficient`` runs under CUDA autocast, whose float32 list holds
    ``linalg_vector_norm`` and ``sum`` (ATen's AT_FORALL_FP32_SET_OPT_DTYPE): its unit vectors, products and
    result are float32 although y and v are bf16. Given v in float32, the record's function takes that path on
    CPU too; pgolf's XSA on the bf16 tensors under autocast must equal it bit for bit. Unit vectors rounded to
    bf16 (pgolf before 2026-12-04) would not. Without autocast (a bf16 model, the Hessian pass) both stay bf16."""
    from pgolf.model.gpt import exclusive_self_attention

    y, v = _xsa_inputs()
    theirs = rec.CausalSelfAttention._xsa_efficient(None, y[None], v.float()[None])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = exclusive_self_attention(y, v)
    assert mine.dtype == theirs.dtype == torch.float32
    assert torch.equal(mine, theirs)
    y_g = y.view(40, 4, 2, 64)
    rounded = F.normalize(v.float(), dim=-1).to(y.dtype)[:, :, None, :]
    old = (y_g - (y_g * rounded).sum(dim=-1, keepdim=True) * rounded).view(40, 8, 64)
    assert not torch.equal(old.float(), theirs)
    assert exclusive_self_attention(y, v).dtype == torch.bfloat16  # no autocast: the record's XSA is bf16 there


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xsa_equals_the_records_under_cuda_autocast(rec):
    """The same on the GPU, each side as it runs there: the record on bf16 y and v under CUDA autocast."""
    from pgolf.model.gpt import exclusive_self_attention

    y, v = _xsa_inputs("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        theirs = rec.CausalSelfAttention._xsa_efficient(None, y[None], v[None])[0]
        mine = exclusive_self_attention(y, v)
    assert mine.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
