"""The training stage: schedule, data checks, N-process equivalence, checkpoint, loss going down."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.train.checkpoint import CheckpointError, load_checkpoint, load_initial_weights, model_config_of, save_checkpoint
from pgolf.io import TIMING_FIELDS
from pgolf.config import ConfigError, ModelConfig, OptimConfig, TrainConfig, to_dict
from pgolf.data.loader import BatchPlan, PackedBatchLoader
from pgolf.data.record_stream import RecordStreamLoader
from pgolf.data.shards import BOS_ID, read_shard, write_shard
from pgolf.model.gpt import GPT
from pgolf.train.distributed import DistInfo
from pgolf.train.loop import check_data, cu_seqlens_bucket, lr_multiplier, train_in_group, training_fraction
from pgolf.train.optim import Muon
from pgolf.train.step import cu_seqlens_padded_length
from pgolf.train.warmup import restore, snapshot

VOCAB = 64
TINY_MODEL = ModelConfig(
    vocab_size=VOCAB, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, xsa_last_n=3,
    attn_gate_window=8, smear_gate_window=8, loop_start=1, loop_end=1, loop_count=2, parallel_residual_start=2,
)
TINY_TRAIN = TrainConfig(
    train_batch_tokens=512, micro_batch_tokens=128, train_seq_len=48, max_wallclock_seconds=0.0,
    reserve_seconds=0.0, iterations=4, warmup_steps=1, compile=False, ema_decay=0.5,
    loop_enable_fraction=0.5, log_every_steps=1,
    # pgolf's world-size independent options (the record's stream and per-rank clipping depend on the GPU count)
    data_stream="contiguous", micro_batch_order="blocked", clip_scope="global",
)


def write_data(directory: Path, n_docs: int = 400, seed: int = 0, top_id: int = VOCAB - 1) -> Path:
    """A val shard and two train shards of BOS-prefixed random documents with a learnable pattern."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start = int(rng.integers(8, top_id))
        length = int(rng.integers(5, 60))
        body = (start + np.arange(length)) % (top_id - 7) + 8  # a counting pattern: easy to learn
        docs.append(np.concatenate([[BOS_ID], body]))
    val = np.concatenate(docs[:40]).astype(np.uint16)
    train = np.concatenate(docs[40:]).astype(np.uint16)
    directory.mkdir(parents=True, exist_ok=True)
    write_shard(directory / "fineweb_val_000000.bin", val)
    half = len(train) // 2
    write_shard(directory / "fineweb_train_000000.bin", train[:half])
    write_shard(directory / "fineweb_train_000001.bin", train[half:])
    return directory


def start_train(data_dir: Path, out_dir: Path, nproc: int, model: ModelConfig = TINY_MODEL,
                train: TrainConfig = TINY_TRAIN, seed: int = 7, optim: OptimConfig = OptimConfig()) -> subprocess.Popen:
    """`python -m pgolf.train` (torchrun with ``nproc`` > 1), one CPU thread a process; :func:`finish_train` waits."""
    args = [
        "-m", "pgolf.train",
        "--model-json", json.dumps(to_dict(model)), "--optim-json", json.dumps(to_dict(optim)),
        "--train-json", json.dumps(to_dict(train)), "--seed", str(seed),
        "--data-dir", str(data_dir), "--out-dir", str(out_dir), "--device", "cpu",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_train(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_train(*args, **kwargs) -> subprocess.CompletedProcess:
    return finish_train(start_train(*args, **kwargs))


# ------------------------------------------------------------------------------------------------- pure parts


def test_lr_multiplier_matches_the_record_formula() -> None:
    assert lr_multiplier(0.0, 0.85, 0.10) == 1.0
    assert lr_multiplier(0.149, 0.85, 0.10) == 1.0
    assert lr_multiplier(0.5, 0.85, 0.10) == pytest.approx(0.5 / 0.85)
    assert lr_multiplier(0.95, 0.85, 0.10) == pytest.approx(0.10)  # floored
    assert lr_multiplier(0.95, 0.85, 0.0) == pytest.approx(0.05 / 0.85)
    assert lr_multiplier(0.7, 0.0, 0.1) == 1.0  # no warmdown


def test_training_fraction_time_and_step_based() -> None:
    timed = TrainConfig(max_wallclock_seconds=600.0, reserve_seconds=8.0)
    assert training_fraction(0, 296.0, timed) == pytest.approx(0.5)
    record = TrainConfig(max_wallclock_seconds=600.0, reserve_seconds=0.5, budget_reading="record")
    assert training_fraction(0, 599.5 * 0.35, record) == pytest.approx(0.35)
    assert training_fraction(0, 1000.0, timed) == 1.0
    stepped = TrainConfig(max_wallclock_seconds=0.0, iterations=200)
    assert training_fraction(50, 1e9, stepped) == pytest.approx(0.25)


def test_cu_seqlens_buckets_are_powers_of_two() -> None:
    assert [cu_seqlens_bucket(n) for n in (2, 16, 17, 100, 129)] == [16, 16, 32, 128, 256]
    assert [cu_seqlens_padded_length(n, "multiple_of_64") for n in (2, 64, 65, 129)] == [64, 64, 128, 192]


def test_loader_union_is_identical_for_any_world_size(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    one = PackedBatchLoader(data, BatchPlan(512, 128, 1), rank=0, order="blocked")
    rows_one = [one.micro_batch(3, m)[0] for m in range(4)]
    rows_two = [PackedBatchLoader(data, BatchPlan(512, 128, 2), rank=r, order="blocked").micro_batch(3, m)[0]
                for r in range(2) for m in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(rows_one, rows_two))
    inputs, targets = one.micro_batch(0, 0)
    assert torch.equal(inputs[1:], targets[:-1])  # targets are the next tokens
    # interleaved: the same windows, dealt a * world_size + r
    rows_inter = [PackedBatchLoader(data, BatchPlan(512, 128, 2), rank=r, order="interleaved").micro_batch(3, a)[0]
                  for a in range(2) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(rows_one, rows_inter))


def test_record_stream_spans_stay_inside_one_shard(tmp_path: Path) -> None:
    """PR #1855's stream: n + 1 tokens per window, W windows per call from one shard starting at its first BOS,
    the shard's tail dropped; so the windows depend on the number of ranks."""
    shard0 = np.arange(100, 100 + 1000, dtype=np.uint16)
    shard0[[3, 40, 500]] = BOS_ID
    shard1 = np.arange(2000, 2000 + 700, dtype=np.uint16)
    shard1[[7, 300]] = BOS_ID
    write_shard(tmp_path / "fineweb_train_000000.bin", shard0)
    write_shard(tmp_path / "fineweb_train_000001.bin", shard1)
    two = [RecordStreamLoader(tmp_path, BatchPlan(8 * 16, 16, 2), rank) for rank in range(2)]
    assert list(two[0].calls_per_shard) == [(1000 - 3) // 34, (700 - 7) // 34]
    assert two[0].dropped_tail_tokens() == [(1000 - 3) % 34, (700 - 7) % 34]
    x0, y0 = two[0].micro_batch(0, 0)
    x1, _ = two[1].micro_batch(0, 0)
    assert int(x0[0]) == BOS_ID and int(x0[1]) == 104 and int(y0[-1]) == 100 + 3 + 16  # inputs and targets: 17 tokens
    assert int(x1[1]) == 100 + 3 + 17 + 1  # rank 1's window follows rank 0's, no overlap
    last = int(two[0].calls_per_shard[0])  # the first call of shard 1 starts at its first BOS
    assert two[0].locate(last, 0) == (0, 1, 7) and two[1].locate(last, 1) == (0, 1, 7 + 17)
    assert two[0].locate(two[0].calls_per_epoch, 0) == (1, 0, 3)  # then the files start over
    one = RecordStreamLoader(tmp_path, BatchPlan(8 * 16, 16, 1), 0)
    assert list(one.calls_per_shard) == [(1000 - 3) // 17, (700 - 7) // 17]  # W = 1 reads further into each shard
    write_shard(tmp_path / "fineweb_train_000002.bin", np.full(50, 9, dtype=np.uint16))
    with pytest.raises(ValueError, match="fineweb_train_000002.bin: no BOS token"):
        RecordStreamLoader(tmp_path, BatchPlan(8 * 16, 16, 1), 0)


def test_warmup_restore_keeps_only_muon_momentum_under_record() -> None:
    torch.manual_seed(0)
    w, gain = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.ones(6))
    model = torch.nn.Module()
    model.w, model.gain = w, gain
    muon = Muon([w], lr=0.1, momentum_warmup_start=0.5, momentum_warmup_steps=10, precision="record_bf16")
    adam = torch.optim.AdamW([gain], lr=0.1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for kind, kept in (("full", False), ("record", True)):
        saved = snapshot(model, [muon, adam])
        for _ in range(2):
            w.grad, gain.grad = torch.randn(4, 6), torch.randn(6)
            muon.step()
            adam.step()
        momentum = muon.state[w]["momentum_buffer"].clone()
        restore(model, [muon, adam], saved, kind)
        assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
        assert len(adam.state) == 0 and muon.param_groups[0]["step"] == 0 and w.grad is None
        if kept:
            assert muon.state[w]["momentum_buffer"].dtype == torch.bfloat16
            assert torch.equal(muon.state[w]["momentum_buffer"], momentum)
        else:
            assert "momentum_buffer" not in muon.state[w]


def test_init_checkpoint_replaces_the_seeded_init(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    torch.manual_seed(123)
    start = {k: torch.randn_like(v) * 0.02 for k, v in GPT(TINY_MODEL).state_dict().items()}
    save_checkpoint(tmp_path / "init", start, {"model_config": to_dict(TINY_MODEL)})
    model = GPT(TINY_MODEL)
    load_initial_weights(model, TINY_MODEL, tmp_path / "init")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in start.items())
    other = ModelConfig(**{**to_dict(TINY_MODEL), "logit_softcap": 20.0})
    with pytest.raises(CheckpointError, match="model_config differs from the recipe's model section in logit_softcap"):
        load_initial_weights(GPT(other), other, tmp_path / "init")
    one_step = TrainConfig(**{**to_dict(TINY_TRAIN), "iterations": 1, "warmup_steps": 0, "ema_decay": 0.0})
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train_in_group(TINY_MODEL, OptimConfig(), one_step, 7, data, tmp_path / "out", cpu, init_checkpoint=tmp_path / "init")
    trained, meta = load_checkpoint(tmp_path / "out" / "checkpoint")
    assert meta["init_checkpoint"] == str(tmp_path / "init")
    # one step of lr <= 0.03 from the given weights, far from the seeded init's (o and down start at zero there)
    assert float((trained["blocks.0.attn.o.weight"] - start["blocks.0.attn.o.weight"]).abs().max()) < 0.05
    assert float(trained["blocks.0.attn.o.weight"].abs().min()) > 0


# --------------------------------------------------------------------------------------------- refusals


def test_missing_shards_refused_before_any_step(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no fineweb_train_"):
        check_data(tmp_path / "empty", VOCAB)
    proc = run_train(tmp_path / "empty", tmp_path / "out", 1)
    assert proc.returncode != 0 and "no fineweb_train_" in proc.stderr
    assert not (tmp_path / "out" / "checkpoint").exists()
    from pgolf.data.shards import write_shard

    write_shard(tmp_path / "empty" / "fineweb_train_000000.bin", np.zeros(0, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"1 fineweb_train_\*\.bin shard\(s\) hold no tokens"):
        check_data(tmp_path / "empty", VOCAB)


def test_vocab_smaller_than_token_ids_refused(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", top_id=200)
    with pytest.raises(ValueError, match=r"token id \d+ >= model.vocab_size 64"):
        check_data(data, VOCAB)
    (data / "manifest.json").write_text("[1]")  # a manifest that is no object: named, not an AttributeError
    with pytest.raises(ValueError, match=r"manifest.json: data manifest must be a JSON object, got list"):
        check_data(data, VOCAB)


def test_a_divergence_between_logged_steps_writes_no_checkpoint(tmp_path: Path) -> None:
    """Learning rates far too large blow the loss up after step 1 (logged) and before the next logged step: the run
    fails naming it, and no checkpoint of non-finite weights is left for the later stages."""
    data = write_data(tmp_path / "data")
    lrs = {f.name: 1e9 for f in dataclasses.fields(OptimConfig) if f.name.endswith("_lr")}
    train = dataclasses.replace(TINY_TRAIN, iterations=8, log_every_steps=100, ema_decay=0.0)
    proc = run_train(data, tmp_path / "out", 1, train=train, optim=OptimConfig(**lrs))
    assert proc.returncode == 2 and "training loss was not finite at a step after the last logged one" in proc.stderr, \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_a_later_shard_of_another_vocabulary_is_refused_naming_the_batch(tmp_path: Path) -> None:
    """check_data reads one training shard; a later one with ids past the model's vocabulary is refused when the
    stream reaches it, before the embedding would index out of range."""
    data = write_data(tmp_path / "data")
    shard = data / "fineweb_train_000001.bin"
    tokens = read_shard(shard).copy()
    tokens[tokens != BOS_ID] = VOCAB + 5
    write_shard(shard, tokens)
    check_data(data, VOCAB)  # the first shard passes
    proc = run_train(data, tmp_path / "out", 1, train=dataclasses.replace(TINY_TRAIN, iterations=40))
    assert proc.returncode != 0 and f"holds token id {VOCAB + 5} >= model.vocab_size {VOCAB}" in proc.stderr, \
        proc.stderr[-2000:]
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_bad_section_json_names_the_key(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    bad = dict(to_dict(TINY_TRAIN), warmup_stepz=3)
    proc = subprocess.run(
        [sys.executable, "-m", "pgolf.train", "--model-json", json.dumps(to_dict(TINY_MODEL)), "--optim-json", "{}",
         "--train-json", json.dumps(bad), "--seed", "1", "--data-dir", str(data), "--out-dir", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "--train-json: warmup_stepz: unknown key (did you mean 'warmup_steps'?)" in proc.stderr


# ----------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One process and two (torchrun) on the same data, at once: three one-thread processes on CI's two cores
    take less time together than one after the other (~10 s -> ~7 s)."""
    root = tmp_path_factory.mktemp("train")
    data = write_data(root / "data")
    one, two = start_train(data, root / "one", 1), start_train(data, root / "two", 2)
    return root, finish_train(one), finish_train(two)


def test_two_processes_equal_one_process_with_accumulation(two_runs) -> None:
    root, one, two = two_runs
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    state_one, meta_one = load_checkpoint(root / "one" / "checkpoint")
    state_two, meta_two = load_checkpoint(root / "two" / "checkpoint")
    assert meta_one["grad_accum_steps"] == 4 and meta_two["grad_accum_steps"] == 2
    assert meta_one["world_size"] == 1 and meta_two["world_size"] == 2
    assert meta_one["steps"] == meta_two["steps"] == 4
    for name, tensor in state_one.items():
        torch.testing.assert_close(state_two[name], tensor, rtol=1e-4, atol=2e-5, msg=name)
    # the runs really trained: o starts at zero and moved
    assert float(state_one["blocks.0.attn.o.weight"].abs().sum()) > 0



@pytest.mark.slow  # two more training processes, at once (~7 s on a 2-core machine; ~10 s one after the other)
def test_the_record_warm_up_on_the_contiguous_stream_does_not_depend_on_the_process_count(tmp_path) -> None:
    """Compile passes plus a warm-up whose Muon momentum survives (the record's warm-up options) on pgolf's
    contiguous stream: the warm-up reads the same micro-batches on 1 and 2 processes (it started one stream call
    late, a shift that lands on other slots per rank count, and the carried momentum made the weights differ)."""
    data = write_data(tmp_path / "data")
    train = dataclasses.replace(TINY_TRAIN, warmup_cu_passes=1, warmup_restore="record")
    runs = [finish_train(proc) for proc in [start_train(data, tmp_path / f"n{n}", n, train=train) for n in (1, 2)]]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    (one, _), (two, _) = (load_checkpoint(tmp_path / f"n{n}" / "checkpoint") for n in (1, 2))
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=2e-5, msg=name)

def test_checkpoint_describes_itself(two_runs) -> None:
    root, one, _ = two_runs
    state, meta = load_checkpoint(root / "one" / "checkpoint")
    assert model_config_of(meta) == TINY_MODEL
    assert meta["train_config"] == to_dict(TINY_TRAIN)
    assert meta["weights"] == "ema" and meta["tokens_seen"] == 4 * 512
    assert len(meta["code_hash"]) == 64 and meta["loop_enabled_step"] == 2  # loop_enable_fraction 0.5 of 4 steps
    # measurements live in train_summary.json, never in the checkpoint (pgolf.io.TIMING_FIELDS)
    assert not set(TIMING_FIELDS["train_summary.json"]) & set(meta)
    summary = json.loads((root / "one" / "train_summary.json").read_text())
    assert summary["environment"]["torch"] == torch.__version__ and summary["train_seconds"] > 0
    assert summary["earlier_attempts"] == 0 and summary["resumed_from_step"] is None
    assert not (root / "one" / ".metrics.jsonl.partial").exists() and not (root / "one" / "resume").exists()
    lines = [json.loads(line) for line in (root / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["event"] == "train_step"] == [1, 2, 3, 4]
    assert lines[-1]["event"] == "train_done"


def test_summary_records_the_attention_kernels_and_the_warm_up(two_runs) -> None:
    root, one, _ = two_runs
    summary = json.loads((root / "one" / "train_summary.json").read_text())
    _, meta = load_checkpoint(root / "one" / "checkpoint")
    assert summary["attention_backend"]["requested"] == "auto" and summary["attention_backend"]["resolved"] == "sdpa"
    assert "attention_backend" not in meta  # the machine's choice: train_summary.json only (pgolf.io.TIMING_FIELDS)
    # warmup_steps 1: one step looping off, one on, no compile passes; eager: no graphs
    warm = summary["compile_warmup_by_loop_state"]
    assert set(warm) == {"off", "on"}
    for state in warm.values():
        assert state["steps"] == 1 and state["compile_passes"] == 0 and state["graphs_compiled"] == 0
    assert 0 < warm["off"]["seconds"] + warm["on"]["seconds"] <= summary["compile_warmup_seconds"]
    assert summary["compile_warmup_seconds"] <= summary["startup_seconds"]


def test_corrupted_checkpoint_refused(two_runs, tmp_path: Path) -> None:
    root, _, _ = two_runs
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for f in (root / "one" / "checkpoint").iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(copy)
    (copy / "model.pt").write_bytes((root / "one" / "checkpoint" / "model.pt").read_bytes())
    meta_path = copy / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    name = sorted(meta["tensors"])[0]
    meta["tensors"][name]["dtype"] = "float16"  # the table must describe the weights: dtype as well as shape
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"model.pt: {name} has dtype float32, checkpoint.json says float16"):
        load_checkpoint(copy)
    del meta["tensors"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checkpoint.json: key 'tensors' expected dict, got None"):
        load_checkpoint(copy)
    # metadata that is no object, a version from nowhere, an architecture missing: named errors, no traceback
    from pgolf.train.checkpoint import read_checkpoint_meta

    meta_path.write_text("[]")
    with pytest.raises(CheckpointError, match="checkpoint metadata must be a JSON object, got list"):
        read_checkpoint_meta(copy)
    meta_path.write_text(json.dumps({**meta, "version": 0}))
    with pytest.raises(CheckpointError, match="version 0, expected an integer from 1 to"):
        read_checkpoint_meta(copy)
    with pytest.raises(CheckpointError, match="checkpoint.json: no model_config object"):
        model_config_of({k: v for k, v in meta.items() if k != "model_config"})


def test_loss_goes_down(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    train = TrainConfig(
        train_batch_tokens=512, micro_batch_tokens=256, train_seq_len=64, max_wallclock_seconds=0.0,
        reserve_seconds=0.0, iterations=30, warmup_steps=0, compile=False, ema_decay=0.0,
        log_every_steps=1, warmdown_fraction=0.3,
    )
    proc = run_train(data, tmp_path / "out", 1, train=train)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train_step"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
    # 30 steps of 512 tokens read more than the training shards hold: said once, at the step that crosses
    from pgolf.data.shards import list_shards, read_header

    train_tokens = sum(read_header(p).num_tokens for p in list_shards(data, "train"))
    repeated = [r for r in records if r["event"] == "data_repeated"]
    assert [r["step"] for r in repeated] == [train_tokens // 512 + 1] and repeated[0]["train_tokens"] == train_tokens
    assert proc.stderr.count("the stream starts over (a second epoch)") == 1


def test_the_record_stream_says_when_it_starts_over(tmp_path: Path) -> None:
    """The record's stream wraps after its last whole span of calls (each shard's head and tail are never read), so
    before the shards' raw token count: data_repeated names the first step that reads epoch 1."""
    data = write_data(tmp_path / "data", n_docs=120)
    tokens = np.concatenate([read_shard(p) for p in sorted(data.glob("fineweb_train_*.bin"))])
    for p in data.glob("fineweb_train_*.bin"):
        p.unlink()
    for i in range(12):  # 12 shards of 300 tokens: 2 spans of 129 each, 42 tokens of each never read
        write_shard(data / f"fineweb_train_{i:06d}.bin", np.concatenate([[BOS_ID], tokens[i * 299 : (i + 1) * 299]]))
    cfg = TrainConfig(**{**to_dict(TINY_TRAIN), "iterations": 12, "warmup_steps": 0, "ema_decay": 0.0,
                         "data_stream": "record", "micro_batch_order": "interleaved"})
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train_in_group(TINY_MODEL, OptimConfig(), cfg, 7, data, tmp_path / "out", cpu)
    plan = BatchPlan(cfg.train_batch_tokens, cfg.micro_batch_tokens, 1)
    stream, accum = RecordStreamLoader(data, plan, 0), plan.grad_accum_steps
    first_epoch_1 = min(s for s in range(1, 13) if stream.locate(s * accum - 1, 0)[0] == 1)  # 1-based step
    assert first_epoch_1 < 12 * 300 // cfg.train_batch_tokens + 1  # earlier than the shards' raw token count says
    records = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "data_repeated"] == [first_epoch_1]


# ------------------------------------------------------------------------------ compile options (issue 16)

SPLIT_ADDMM = {"post_grad_custom_post_pass": "pgolf.SplitResidualAddmm"}  # train.compile_add_into_matmul: false


def test_fusion_options_reach_torch_compile_of_the_training_step(tmp_path: Path, monkeypatch) -> None:
    """train.compile_max_fusion_io_buffers and train.compile_mix_order_reduction are what the training stage passes
    to inductor (their names checked by the installed torch, which refuses unknown options when torch.compile is
    called), and train.compile_add_into_matmul false adds pgolf's graph pass; (0, true, true) pass no options."""
    from pgolf.model.device import compile_model, inductor_options, recorded_options

    assert inductor_options("inductor", 0) is None and inductor_options("aot_eager", 16) is None
    assert inductor_options("inductor", 16) == {"max_fusion_unique_io_buffers": 16}
    assert inductor_options("inductor", 0, mix_order_reduction=False) == {"triton.mix_order_reduction": False}
    assert inductor_options("aot_eager", 0, mix_order_reduction=False) is None
    split = inductor_options("inductor", 0, add_into_matmul=False)
    assert list(split) == ["post_grad_custom_post_pass"] and recorded_options(split) == SPLIT_ADDMM
    compile_model(torch.nn.Linear(2, 2), True, "inductor", 16, False)  # an unknown option name would raise here
    calls = []

    def spy(model, **kwargs):
        calls.append(kwargs)
        return model  # eager: the spy only records how training compiles

    monkeypatch.setattr(torch, "compile", spy)
    data = write_data(tmp_path / "data")
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cases = ((16, True, True, {"max_fusion_unique_io_buffers": 16}), (0, True, True, None),
             (0, False, True, {"triton.mix_order_reduction": False}), (0, True, False, SPLIT_ADDMM))
    for cap, mix_order, add_into_matmul, expected in cases:
        cfg = TrainConfig(**{**to_dict(TINY_TRAIN), "iterations": 1, "warmup_steps": 0, "compile": True,
                             "compile_max_fusion_io_buffers": cap, "compile_mix_order_reduction": mix_order,
                             "compile_add_into_matmul": add_into_matmul})
        out = tmp_path / f"out{cap}{mix_order}{add_into_matmul}"
        train_in_group(TINY_MODEL, OptimConfig(), cfg, 7, data, out, cpu)
        options = calls[-1].pop("options")
        assert calls[-1] == {"fullgraph": True, "dynamic": False, "backend": "inductor"}
        assert recorded_options(options) == expected
        _, meta = load_checkpoint(out / "checkpoint")
        assert meta["train_config"]["compile_max_fusion_io_buffers"] == cap  # recorded with the result
        assert meta["train_config"]["compile_mix_order_reduction"] is mix_order


@pytest.mark.parametrize("cap", [1, -1])
def test_fusion_cap_below_two_is_refused(cap: int) -> None:
    with pytest.raises(ConfigError, match="compile_max_fusion_io_buffers: expected 0 .no cap. or >= 2"):
        TrainConfig(compile_max_fusion_io_buffers=cap)


def test_a_training_error_closes_the_prefetcher(tmp_path: Path, monkeypatch) -> None:
    """However the loop ends, the worker reading micro-batches ahead (pgolf.train.prefetch) is closed and joined
    then, not whenever the garbage collector finds it: an in-process caller (a sweep, a test) keeps no thread
    holding the shards open."""
    import pgolf.train.loop as loop

    real_step, steps, prefetchers = loop.optimizer_step, [], []

    def failing_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:  # the warm-up's step per loop state, then the loop's first: it raises mid-loop
            raise RuntimeError("injected failure in the optimizer step")
        return real_step(*args, **kwargs)

    class KeptPrefetcher(loop.MicroBatchPrefetcher):  # kept alive here, so only close() can stop its worker
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            prefetchers.append(self)

    monkeypatch.setattr(loop, "optimizer_step", failing_step)
    monkeypatch.setattr(loop, "MicroBatchPrefetcher", KeptPrefetcher)
    data = write_data(tmp_path / "data")
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = TrainConfig(**{**to_dict(TINY_TRAIN), "iterations": 4})
    with pytest.raises(RuntimeError, match="injected failure"):
        train_in_group(TINY_MODEL, OptimConfig(), cfg, 7, data, tmp_path / "out", cpu)
    assert len(steps) == 3 and len(prefetchers) == 1
    assert prefetchers[0]._pool is None  # closed: read-ahead cancelled, worker joined


def test_split_residual_addmm_pass_rewrites_only_full_size_adds() -> None:
    """train.compile_add_into_matmul false: pgolf's post-grad pass turns addmm(x, a, b) with a 2-D x of the product's
    shape into mm(a, b) + x (the same values), and leaves a bias addmm (1-D x: no copy in cuBLAS) and a scaled one
    (beta != 1) alone."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from pgolf.model.compile_passes import SplitResidualAddmm

    aten = torch.ops.aten

    def step(x, bias, a, b):
        return aten.addmm.default(x, a, b), aten.addmm.default(bias, a, b), aten.addmm.default(x, a, b, beta=2)

    inputs = (torch.randn(6, 5), torch.randn(5), torch.randn(6, 4), torch.randn(4, 5))
    gm = make_fx(step, tracing_mode="fake")(*inputs)
    SplitResidualAddmm()(gm.graph)
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.addmm.default) == 2 and aten.mm.default in targets and aten.add.Tensor in targets
    split = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
    assert split.meta["val"].shape == (6, 5)  # the rewritten nodes carry the shapes inductor lowers from
    full, biased, scaled = gm(*inputs)
    x, bias, a, b = inputs
    torch.testing.assert_close(full, x + a @ b)
    torch.testing.assert_close(biased, bias + a @ b)
    torch.testing.assert_close(scaled, 2 * x + a @ b)
    assert SplitResidualAddmm().uuid() == "pgolf.SplitResidualAddmm.v1"  # inductor's cache key for the pass
