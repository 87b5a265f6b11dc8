"""The Hessian stage: H = X^T X / n at the right hook positions, looping, training-only calibration, budget gate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_fixtures import TINY_MODEL, TINY_TRAIN, VOCAB, train_checkpoint, write_shards

from pgolf.config import HessianConfig, to_dict
from pgolf.data.loader import TokenStream
from pgolf.data.shards import BOS_ID, list_shards
from pgolf.cli import main as cli_main
from pgolf.quantize.hessians import (
    HessianError,
    budget_check,
    calibration_batches,
    calibration_offsets,
    collect_hessians,
    load_hessians,
    packed_rows_cu_seqlens,
    record_calibration_rows,
    row_batch,
)
from pgolf.model.gpt import GPT, rms_norm

CAL = HessianConfig(batches=2, batch_rows=3, seq_len=40)


def _perturbed_model(cfg=TINY_MODEL, seed: int = 0) -> GPT:
    """Init zeroes o/down/gates; random values make every activation (and so every H) non-trivial."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("hess") / "shards", val_top_id=60_000)


@pytest.fixture(scope="module")
def batches(data_dir):
    return calibration_batches(data_dir, CAL, seed=5)


# ------------------------------------------------------------------------------------------- X^T X at the hooks


def _capture_inputs(model: GPT, module_names: list[str], batches) -> dict[str, list[torch.Tensor]]:
    """Every input each module sees, through ordinary forward hooks (independent of the stage's pre-hooks)."""
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in module_names}
    handles = [
        model.get_submodule(m).register_forward_hook(
            lambda mod, args, out, m=m: seen[m].append(args[0].detach().double())
        )
        for m in module_names
    ]
    model.looping = True
    with torch.no_grad():
        for ids, cu, reset in batches:
            model.lm_head(model.forward_hidden(ids, cu, CAL.seq_len, smear_reset=reset))
    model.looping = False
    for h in handles:
        h.remove()
    return seen


def test_hessians_equal_xtx_over_n_with_looping(batches) -> None:
    model = _perturbed_model()
    rows: dict[str, int] = {}
    H = collect_hessians(model, batches, "cpu", rows_out=rows)
    assert model.looping is False  # runtime flag restored
    tokens = sum(batch[0].numel() for batch in batches)
    inputs = model.hessian_inputs()
    modules = sorted(set(inputs.values()))
    captured = _capture_inputs(model, modules, batches)
    applications = {0: 1, 1: 2, 2: 1}  # TINY_MODEL loops layer 1 twice
    for weight, module in inputs.items():
        X = torch.cat(captured[module])  # [tokens x applications, cols]
        layer = int(module.split(".")[1]) if module.startswith("blocks.") else None
        expected_rows = tokens * (applications[layer] if layer is not None else 1)
        assert X.shape[0] == expected_rows == rows[module], weight
        direct = (X.T @ X) / X.shape[0]
        torch.testing.assert_close(H[weight].double(), direct, rtol=1e-5, atol=1e-6, msg=weight)
    # q, k and v share one tensor; the tied embedding has exactly the head input's statistics
    assert H["blocks.1.attn.q.weight"] is H["blocks.1.attn.k.weight"] is H["blocks.1.attn.v.weight"]
    assert inputs["tok_emb.weight"] == "lm_head"


def test_hook_positions_by_their_normalization(batches) -> None:
    """q's input is rmsnorm(x) / sqrt(layer + 1), the head's input is the final rmsnorm: known diagonals."""
    H = collect_hessians(_perturbed_model(seed=1), batches, "cpu")
    for layer in range(TINY_MODEL.num_layers):
        mean_square = float(H[f"blocks.{layer}.attn.q.weight"].diagonal().mean())
        assert mean_square == pytest.approx(1.0 / (layer + 1), rel=1e-4)
    assert float(H["tok_emb.weight"].diagonal().mean()) == pytest.approx(1.0, rel=1e-4)
    # and the head input is the final-norm output itself (not the pre-norm residual)
    model = _perturbed_model(seed=1)
    model.looping = True
    with torch.no_grad():
        h = torch.cat([model.forward_hidden(ids, cu, CAL.seq_len, smear_reset=r).double() for ids, cu, r in batches])
    torch.testing.assert_close(H["tok_emb.weight"].double(), h.T @ h / h.shape[0], rtol=1e-5, atol=1e-6)


def test_first_layer_q_input_by_hand(batches) -> None:
    """Layer 0's attention input rebuilt from the embedding by hand: rmsnorm(mix(rmsnorm(smear(emb)))) (the record
    smears the raw embedding, then normalizes), each calibration row on its own (no smear across row starts)."""
    model = _perturbed_model(seed=2)
    with torch.no_grad():
        model.smear.lam.fill_(0.5)  # a visible smear, so a row start fed by the previous row would show
    H = collect_hessians(model, batches, "cpu")
    block = model.blocks[0]
    total, n = torch.zeros(32, 32, dtype=torch.float64), 0
    with torch.no_grad():
        for ids, _, _ in batches:
            x = torch.cat([model.smear(model.tok_emb(row), row, BOS_ID) for row in ids.view(-1, CAL.seq_len)])
            x = rms_norm(x)
            x_in = block.resid_mix[0] * x + block.resid_mix[1] * x  # x0 == x before the first block
            q_in = (rms_norm(x_in) * block.ln_scale).double()
            total += q_in.T @ q_in
            n += q_in.shape[0]
    torch.testing.assert_close(H["blocks.0.attn.q.weight"].double(), total / n, rtol=1e-5, atol=1e-6)


def test_untied_head_from_final_norm_and_identity_for_input_embedding(batches) -> None:
    cfg = dataclasses.replace(TINY_MODEL, tie_embeddings=False)
    model = _perturbed_model(cfg, seed=3)
    H = collect_hessians(model, batches, "cpu")
    assert torch.equal(H["tok_emb.weight"], torch.eye(cfg.model_dim))
    assert float(H["lm_head.weight"].diagonal().mean()) == pytest.approx(1.0, rel=1e-4)


def test_sums_stay_float32_under_bf16_autocast(batches) -> None:
    """The CUDA path runs forwards under bf16 autocast; autocast must not reach the hooks' X^T X products."""
    model = _perturbed_model(seed=5)
    reference = collect_hessians(model, batches, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        H = collect_hessians(model, batches, "cpu")
    for name, ref in reference.items():
        assert H[name].dtype == torch.float32, name
        assert float((H[name] - ref).norm() / ref.norm()) < 3e-2, name


@pytest.mark.gpu
def test_cuda_bf16_hessians_match_cpu_fp32(batches) -> None:
    """On CUDA the forwards run under bf16 autocast; the statistics still agree with the fp32 CPU pass."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _perturbed_model(seed=4)
    cpu = collect_hessians(model, batches, "cpu")
    gpu = collect_hessians(model.cuda(), batches, "cuda")
    for name, H in cpu.items():
        assert gpu[name].device.type == "cpu" and gpu[name].dtype == torch.float32
        assert float((gpu[name] - H).norm() / H.norm()) < 3e-2, name


def test_record_options_normalize_attention_and_bf16_forward(batches) -> None:
    """normalize: batches divides the same sums by the batch count; attention: rows cuts only at row starts;
    forward_dtype: bfloat16 (a bf16 copy, no autocast) stays close to the fp32 pass and leaves the model as it was."""
    model = _perturbed_model(seed=6)
    rows: dict[str, int] = {}
    by_rows = collect_hessians(model, batches, "cpu", rows_out=rows)
    by_batches = collect_hessians(model, batches, "cpu", normalize="batches")
    inputs = model.hessian_inputs()
    for name, H in by_rows.items():
        scaled = H * (rows[inputs[name]] / len(batches))
        torch.testing.assert_close(by_batches[name], scaled, rtol=1e-6, atol=0, msg=name)
    ids, cu, reset = row_batch(batches[0][0].view(CAL.batch_rows, CAL.seq_len), "rows")
    assert cu.tolist() == list(range(0, ids.numel() + 1, CAL.seq_len)) and int(reset.sum()) == CAL.batch_rows
    bf16 = collect_hessians(model, batches, "cpu", forward_dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.float32 and model.looping is False
    for name, H in by_rows.items():
        assert bf16[name].dtype == torch.float32
        assert float((bf16[name] - H).norm() / H.norm()) < 3e-2, name
    with pytest.raises(HessianError, match="normalize"):
        collect_hessians(model, batches, "cpu", normalize="tokens")


def test_record_sampler_rows_come_from_the_rank_shards(data_dir) -> None:
    """The record's sampler: rank r reads shards r, r + world, ...; every row is a seq_len window of one of them
    starting at phase + k * seq_len; no window repeats within one pass; deterministic, independent of the seed."""
    paths = list_shards(data_dir, "train")
    cfg = HessianConfig(batches=3, batch_rows=4, seq_len=40, sampler="record", sampler_world_size=2, sampler_rank=1)
    rows, where = record_calibration_rows(paths, cfg)
    assert rows.shape == (3, 4, 40) and where.shape == (12, 2) and set(where[:, 0].tolist()) == {0}
    shard = TokenStream([paths[1]])
    for row, (_, start) in zip(rows.reshape(-1, 40), where, strict=True):
        assert np.array_equal(row, shard.read(int(start), 40))
    assert len({int(s) for _, s in where}) == 12 and len({int(s) % 40 for _, s in where}) == 1  # one phase
    again, _ = record_calibration_rows(paths, cfg)
    assert np.array_equal(rows, again)
    batches = calibration_batches(data_dir, cfg, seed=0)
    assert torch.equal(batches[0][0], torch.from_numpy(rows[0].astype(np.int64)).reshape(-1))
    assert torch.equal(batches[0][0], calibration_batches(data_dir, cfg, seed=9)[0][0])
    with pytest.raises(HessianError, match="no training shard"):
        record_calibration_rows(paths, dataclasses.replace(cfg, sampler_world_size=8, sampler_rank=5))


def test_no_batches_is_an_error() -> None:
    with pytest.raises(HessianError, match="never ran"):
        collect_hessians(_perturbed_model(), [], "cpu")


# ------------------------------------------------------------------------------------------- calibration data


def test_calibration_reads_train_rows_at_seeded_offsets(data_dir, batches) -> None:
    """Val holds id 60,000 (no model could embed it): calibration never sees it, and every row is a train row."""
    stream = TokenStream(list_shards(data_dir, "train"))
    offsets = calibration_offsets(stream.total_tokens, CAL, seed=5)
    assert offsets.shape == (CAL.batches, CAL.batch_rows)
    for (ids, cu, reset), batch_offsets in zip(batches, offsets, strict=True):
        assert reset.tolist() == [i % CAL.seq_len == 0 for i in range(ids.numel())]
        assert ids.shape == (CAL.batch_rows * CAL.seq_len,) and ids.dtype == torch.int64
        assert int(ids.max()) < VOCAB
        rows = ids.view(CAL.batch_rows, CAL.seq_len)
        for row, offset in zip(rows, batch_offsets, strict=True):
            assert np.array_equal(row.numpy(), stream.read(int(offset), CAL.seq_len).astype(np.int64))
        # segments: every row start and every BOS, nothing else
        starts = {r * CAL.seq_len for r in range(CAL.batch_rows)} | set(torch.nonzero(ids == BOS_ID).flatten().tolist())
        assert cu.tolist() == sorted(starts) + [ids.numel()]
    again = calibration_batches(data_dir, CAL, seed=5)
    other = calibration_batches(data_dir, CAL, seed=6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other, strict=True))


def test_packed_rows_cu_seqlens_cuts_at_row_starts() -> None:
    rows = torch.tensor([[5, 6, BOS_ID, 7], [8, 9, 10, 11], [BOS_ID, 3, BOS_ID, 4]])
    assert packed_rows_cu_seqlens(rows).tolist() == [0, 2, 4, 8, 10, 12]


def test_calibration_refusals(tmp_path: Path) -> None:
    only_val = tmp_path / "val_only"
    write_shards(only_val)
    for p in list_shards(only_val, "train"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="fineweb_train"):
        calibration_batches(only_val, CAL, seed=0)
    with pytest.raises(HessianError, match="fewer than one calibration row"):
        calibration_offsets(10, CAL, seed=0)
    with pytest.raises(HessianError, match="seed"):
        calibration_offsets(1000, CAL, seed=-1)


# ----------------------------------------------------------------------------------------------- stage entry


@pytest.fixture(scope="module")
def clean_data_dir(tmp_path_factory) -> Path:
    """The same train shards as ``data_dir`` but a clean val shard (training itself refuses unembeddable ids)."""
    return write_shards(tmp_path_factory.mktemp("clean") / "shards")


@pytest.fixture(scope="module")
def checkpoint(clean_data_dir, tmp_path_factory) -> Path:
    return train_checkpoint(clean_data_dir, tmp_path_factory.mktemp("train"))


def _run(checkpoint: Path, data_dir: Path, out_dir: Path, mode: str, cfg: HessianConfig = CAL) -> int:
    return cli_main(
        [
            "hessians",
            "--checkpoint",
            str(checkpoint),
            "--data-dir",
            str(data_dir),
            "--hessian-json",
            json.dumps(to_dict(cfg)),
            "--seed",
            "4",
            "--mode",
            mode,
            "--out",
            str(out_dir / "hessians.pt"),
            "--report",
            str(out_dir / "report.json"),
            "--device",
            "cpu",
        ]
    )


def test_stage_writes_hessians_and_report(checkpoint, data_dir, tmp_path: Path) -> None:
    """``data_dir``'s val shard holds an unembeddable id: the stage never reads it."""
    assert _run(checkpoint, data_dir, tmp_path, "record") == 0  # step-based training: no cap to exceed
    H = load_hessians(tmp_path / "hessians.pt")
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(H) == set(report["matrices"]) == set(GPT(TINY_MODEL).hessian_inputs())
    assert report["looping"] is True and report["block_applications"] == 4
    assert report["calibration_tokens"] == CAL.batches * CAL.batch_rows * CAL.seq_len
    assert report["matrices"]["blocks.1.mlp.up.weight"]["rows_seen"] == 2 * report["calibration_tokens"]
    assert report["train_plus_hessian_seconds"] == pytest.approx(report["train_seconds"] + report["hessian_seconds"])
    assert report["budget_applies"] is False and report["refused"] is False
    # a second run is byte-identical (the file's sha256 is an input hash of the artifact)
    first = (tmp_path / "hessians.pt").read_bytes()
    assert _run(checkpoint, data_dir, tmp_path, "sweep") == 0
    assert (tmp_path / "hessians.pt").read_bytes() == first


def test_stage_with_the_record_calibration(checkpoint, data_dir, tmp_path: Path) -> None:
    cfg = dataclasses.replace(CAL, normalize="batches", sampler="record", sampler_world_size=2, attention="rows",
                              forward_dtype="bfloat16")
    assert _run(checkpoint, data_dir, tmp_path, "sweep", cfg) == 0
    H = load_hessians(tmp_path / "hessians.pt")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["hessian_config"]["sampler"] == "record"
    assert report["calibration_tokens"] == CAL.batches * CAL.batch_rows * CAL.seq_len
    # / batches: the head input is final-normed (mean square 1 per token), summed over a batch's tokens
    tokens_per_batch = CAL.batch_rows * CAL.seq_len
    assert float(H["tok_emb.weight"].diagonal().mean()) == pytest.approx(tokens_per_batch, rel=2e-2)


def test_budget_gate_refuses_record_runs_over_the_cap(clean_data_dir, data_dir, tmp_path: Path) -> None:
    """A time-based run with a 0.05 s cap: its first step alone exceeds it, so train + Hessians is over."""
    timed = dataclasses.replace(TINY_TRAIN, max_wallclock_seconds=0.05, iterations=50)
    ckpt = train_checkpoint(clean_data_dir, tmp_path / "train", train_cfg=timed)
    record, sweep = tmp_path / "record", tmp_path / "sweep"
    record.mkdir()
    (record / "hessians.pt").write_bytes(b"an earlier run's Hessians of the same weights")  # quantize would take it
    assert _run(ckpt, data_dir, record, "record") == 3
    assert not (record / "hessians.pt").exists()
    report = json.loads((record / "report.json").read_text())
    assert report["refused"] is True and report["within_budget"] is False
    assert report["train_plus_hessian_seconds"] > report["max_wallclock_seconds"] == 0.05
    assert "OVER by" in report["message"]
    assert _run(ckpt, data_dir, sweep, "sweep") == 0  # sweeps report it but go on
    assert (sweep / "hessians.pt").exists()
    assert json.loads((sweep / "report.json").read_text())["within_budget"] is False


def test_budget_check_arithmetic() -> None:
    inside = budget_check(590.0, 8.0, 600.0)
    assert inside["within_budget"] is True and inside["train_plus_hessian_seconds"] == 598.0
    over = budget_check(595.0, 8.0, 600.0)
    assert over["within_budget"] is False and "OVER by 3.00 s" in over["message"]
    assert budget_check(None, 1.0, 600.0)["within_budget"] is False
    assert budget_check(1e9, 1.0, 0.0)["budget_applies"] is False


def test_budget_check_under_the_record_reading() -> None:
    # PR #1855's run: the loop stops after 599.6 s, the Hessians take 4.7 s after it
    record = budget_check(599.6, 4.7, 600.0, "record")
    assert record["within_budget"] is True and record["budget_reading"] == "record"
    assert "train 599.60 s within the 600 s budget" in record["message"]
    assert "strict reading: train 599.60 s + Hessians 4.70 s = 604.30 s, OVER by 4.30 s" in record["message"]
    assert budget_check(599.6, 4.7, 600.0)["within_budget"] is False  # strict: the default reading
    assert budget_check(600.5, 0.0, 600.0, "record")["within_budget"] is False


def test_bad_section_and_unreadable_hessians(checkpoint, data_dir, tmp_path: Path, capsys) -> None:
    bad = cli_main(
        [
            "hessians",
            "--checkpoint",
            str(checkpoint),
            "--data-dir",
            str(data_dir),
            "--hessian-json",
            '{"batches": 0}',
            "--seed",
            "1",
            "--out",
            str(tmp_path / "h.pt"),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    assert bad == 2 and "batches: expected >= 1" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(HessianError, match="junk.pt"):
        load_hessians(tmp_path / "junk.pt")
    torch.save({"w": torch.zeros(3, 4)}, tmp_path / "rect.pt")
    with pytest.raises(HessianError, match="square float32"):
        load_hessians(tmp_path / "rect.pt")
    torch.save({"w": -torch.eye(3)}, tmp_path / "neg.pt")  # GPTQ would take every column as dead: plain RTN
    with pytest.raises(HessianError, match="w: has a negative diagonal entry"):
        load_hessians(tmp_path / "neg.pt")


def test_hessians_name_their_checkpoint_and_quantize_refuses_others(tmp_path):
    """hessians.pt records the weights it was collected from; quantizing another checkpoint with it is refused (the
    artifact would name Hessians of other weights). A bare {name: matrix} file is read without the check."""
    from pgolf.quantize.hessians import HESSIANS_FORMAT

    matrices = {"w": torch.eye(3)}
    torch.save({"format": HESSIANS_FORMAT, "checkpoint_weights_sha256": "a" * 64, "matrices": matrices},
               tmp_path / "h.pt")
    assert torch.equal(load_hessians(tmp_path / "h.pt", "a" * 64)["w"], torch.eye(3))
    with pytest.raises(HessianError, match=r"h.pt: collected from the checkpoint with weights sha256 aaaa.*not the one "
                                           r"being quantized \(bbbb"):
        load_hessians(tmp_path / "h.pt", "b" * 64)
    torch.save(matrices, tmp_path / "bare.pt")
    assert torch.equal(load_hessians(tmp_path / "bare.pt", "b" * 64)["w"], torch.eye(3))
