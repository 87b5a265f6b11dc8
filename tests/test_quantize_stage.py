"""The quantize stage: checkpoint + Hessians -> quantized.pt (pickle-free round trip) + error report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from stage_fixtures import TINY_MODEL, train_checkpoint, write_shards

from pgolf.train.checkpoint import load_checkpoint
from pgolf.config import HessianConfig, QuantizeConfig, to_dict
from pgolf.quantize.weights import dequantize_state, quantize_state
from pgolf.quantize.hessians import load_hessians
from pgolf.model.gpt import build_meta
from pgolf.cli import main as cli_main
from pgolf.quantize.stage import QuantizedFileError, load_quantized, payload_bytes, quantize_totals, save_quantized

QCFG = QuantizeConfig(passthrough_max_elements=1024, lqer_top_k=2, lqer_rank=2, lqer_group_size=16)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    data = write_shards(root / "shards")
    ckpt = train_checkpoint(data, root / "train")
    hessians = root / "hessians.pt"
    status = cli_main(
        [
            "hessians",
            "--checkpoint",
            str(ckpt),
            "--data-dir",
            str(data),
            "--seed",
            "1",
            "--mode",
            "sweep",
            "--device",
            "cpu",
            "--hessian-json",
            json.dumps(to_dict(HessianConfig(batches=2, batch_rows=2, seq_len=48))),
            "--out",
            str(hessians),
            "--report",
            str(root / "hessian_report.json"),
        ]
    )
    assert status == 0
    return {"root": root, "checkpoint": ckpt, "hessians": hessians}


def _quantize(chain, out_dir: Path, cfg: QuantizeConfig = QCFG, hessians: Path | None = None) -> int:
    return cli_main(
        [
            "quantize",
            "--checkpoint",
            str(chain["checkpoint"]),
            "--hessians",
            str(hessians or chain["hessians"]),
            "--quantize-json",
            json.dumps(to_dict(cfg)),
            "--out",
            str(out_dir / "quantized.pt"),
            "--report",
            str(out_dir / "report.json"),
            "--threads",
            "1",
        ]
    )


@pytest.fixture(scope="module")
def quantized(chain) -> Path:
    out = chain["root"] / "q"
    assert _quantize(chain, out) == 0
    return out


def test_round_trip_equals_direct_quantization(chain, quantized) -> None:
    qm, provenance = load_quantized(quantized / "quantized.pt")
    state, meta = load_checkpoint(chain["checkpoint"])
    direct = quantize_state(state, build_meta(TINY_MODEL).param_roles(), load_hessians(chain["hessians"]), QCFG)
    assert set(qm.tensors) == set(direct.tensors) == set(state)
    for name, qt in direct.tensors.items():
        got = qm.tensors[name]
        assert (got.role, got.method, got.shape, got.bits, got.clip_sigmas) == (
            qt.role,
            qt.method,
            qt.shape,
            qt.bits,
            qt.clip_sigmas,
        )
        assert (got.lqer is None) == (qt.lqer is None), name
    a, b = dequantize_state(qm), dequantize_state(direct)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert qm.quantize_config == to_dict(QCFG)
    assert provenance["checkpoint_weights_sha256"] == meta["weights_sha256"]
    assert any(qt.lqer is not None for qt in qm.tensors.values())  # the LQER path is exercised


def test_report_lists_every_tensor_with_consistent_totals(chain, quantized) -> None:
    report = json.loads((quantized / "report.json").read_text())
    state, _ = load_checkpoint(chain["checkpoint"])
    assert [t["name"] for t in report["tensors"]] == sorted(state)
    totals = report["totals"]
    gptq = [t for t in report["tensors"] if t["method"] == "gptq"]
    assert totals["gptq_error_sum"] == pytest.approx(sum(t["gptq_error"] for t in gptq))
    assert totals["params"] == sum(t.numel() for t in state.values())
    assert totals["gptq_error_sum"] < totals["rtn_error_sum"]  # GPTQ beats round-to-nearest on its own objective
    assert totals["final_error_sum"] <= totals["gptq_error_sum"]
    assert sorted(totals["lqer_applied"]) == sorted(t["name"] for t in report["tensors"] if t["lqer_applied"])
    qm, _ = load_quantized(quantized / "quantized.pt")
    assert report["payload_bytes"] == payload_bytes(qm)


def test_totals_by_hand() -> None:
    def rec(name, method, numel, bits, rtn=None, gptq=None, lqer=None, applied=False, rel=None):
        return {
            "name": name,
            "method": method,
            "numel": numel,
            "bits": bits,
            "rtn_error": rtn,
            "gptq_error": gptq,
            "lqer_error": lqer,
            "lqer_applied": applied,
            "gptq_rel_error": rel,
        }

    totals = quantize_totals(
        [
            rec("a", "gptq", 100, 6, rtn=4.0, gptq=2.0, lqer=1.5, applied=True, rel=0.1),
            rec("b", "gptq", 50, 7, rtn=2.0, gptq=1.0, lqer=1.2, applied=False, rel=0.3),
            rec("c", "fp16", 10, 16),
        ]
    )
    assert totals["rtn_error_sum"] == 6.0 and totals["gptq_error_sum"] == 3.0
    assert totals["final_error_sum"] == 2.5  # a keeps its LQER error, b its GPTQ error
    assert totals["gptq_over_rtn"] == 0.5
    assert totals["params_by_method"] == {"fp16": 10, "gptq": 150}
    assert totals["params_by_bits"] == {"6": 100, "7": 50, "16": 10}
    assert totals["lqer_applied"] == ["a"]
    assert [w["name"] for w in totals["worst_gptq_rel_error"]] == ["b", "a"]


def test_stage_is_deterministic(chain, quantized, tmp_path: Path) -> None:
    assert _quantize(chain, tmp_path) == 0
    assert (tmp_path / "quantized.pt").read_bytes() == (quantized / "quantized.pt").read_bytes()


def test_a_changed_knob_changes_the_result(chain, quantized, tmp_path: Path) -> None:
    harsher = QuantizeConfig(**{**to_dict(QCFG), "attn_clip_sigmas": 2.0, "attn_bits": 3})
    assert _quantize(chain, tmp_path, harsher) == 0
    new = json.loads((tmp_path / "report.json").read_text())
    old = json.loads((quantized / "report.json").read_text())
    assert new["quantize_config_sha256"] != old["quantize_config_sha256"]
    assert new["totals"]["gptq_error_sum"] > old["totals"]["gptq_error_sum"]


def test_missing_hessian_named(chain, tmp_path: Path, capsys) -> None:
    H = load_hessians(chain["hessians"])
    del H["blocks.2.mlp.down.weight"]
    torch.save(H, tmp_path / "partial.pt")
    assert _quantize(chain, tmp_path, hessians=tmp_path / "partial.pt") == 2
    assert "blocks.2.mlp.down.weight: no Hessian" in capsys.readouterr().err
    assert not (tmp_path / "quantized.pt").exists()
    H = load_hessians(chain["hessians"])
    H["blocks.0.attn.k.weight"] = torch.eye(3)  # of another model: said with the file's path
    torch.save(H, tmp_path / "other.pt")
    assert _quantize(chain, tmp_path, hessians=tmp_path / "other.pt") == 2
    assert f"{tmp_path / 'other.pt'}: blocks.0.attn.k.weight: Hessian shape (3, 3)" in capsys.readouterr().err


def test_load_quantized_refusals(quantized, tmp_path: Path) -> None:
    blob = torch.load(quantized / "quantized.pt", weights_only=True)
    torch.save({**blob, "format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(QuantizedFileError, match="something-else"):
        load_quantized(tmp_path / "foreign.pt")
    torch.save({**blob, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(QuantizedFileError, match="version 99"):
        load_quantized(tmp_path / "future.pt")
    arrays = dict(blob["arrays"])
    del arrays["blocks.0.attn.q.weight:scale"]
    torch.save({**blob, "arrays": arrays}, tmp_path / "missing.pt")
    with pytest.raises(QuantizedFileError, match="blocks.0.attn.q.weight:scale is missing"):
        load_quantized(tmp_path / "missing.pt")
    torch.save({**blob, "arrays": {**blob["arrays"], "stray:q": torch.zeros(1)}}, tmp_path / "extra.pt")
    with pytest.raises(QuantizedFileError, match="stray:q"):
        load_quantized(tmp_path / "extra.pt")


class _NotPlainData:
    pass


def test_pickled_objects_are_never_executed(tmp_path: Path) -> None:
    torch.save({"format": "pgolf-quantized", "version": 1, "payload": _NotPlainData()}, tmp_path / "evil.pt")
    with pytest.raises(QuantizedFileError, match="not a readable quantized model") as err:
        load_quantized(tmp_path / "evil.pt")
    # one line, and never torch's advice to load with weights_only=False (which would run the pickled code)
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)
    from pgolf.quantize.hessians import HessianError, load_hessians

    with pytest.raises(HessianError, match="not a readable hessians file") as err:
        load_hessians(tmp_path / "evil.pt")
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)


def test_save_refuses_colons_in_names(tmp_path: Path, quantized) -> None:
    qm, provenance = load_quantized(quantized / "quantized.pt")
    bad = type(qm)({"a:b": next(iter(qm.tensors.values()))}, qm.quantize_config, [])
    with pytest.raises(QuantizedFileError, match="':'"):
        save_quantized(tmp_path / "bad.pt", bad, provenance)
    assert not (tmp_path / "bad.pt").exists()


def test_report_totals_hold_no_infinity() -> None:
    """A matrix whose reference error is 0 has an infinite relative error: the totals say null, as its own entry
    does, so quantize_report.json stays strict JSON."""
    import math

    from pgolf.quantize.stage import quantize_totals

    entry = {"name": "w", "method": "gptq", "numel": 4, "bits": 6, "rtn_error": 0.0, "gptq_error": 0.04,
             "lqer_error": None, "lqer_applied": False, "gptq_rel_error": math.inf}
    totals = quantize_totals([entry])
    json.dumps(totals, allow_nan=False)  # raises on Infinity
    assert totals["worst_gptq_rel_error"] == [{"name": "w", "gptq_rel_error": None}]
