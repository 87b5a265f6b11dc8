"""The pack stage (artifact, input hashes, size gate, plain-brotli comparison) and ``pgolf pack inspect|check``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from stage_fixtures import TINY_MODEL, train_checkpoint, write_shards

from pgolf.train.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from pgolf.cli import main as cli_main
from pgolf.config import HessianConfig, PackConfig, QuantizeConfig, to_dict
from pgolf.quantize.weights import dequantize_state
from pgolf.io import sha256_file
from pgolf.artifact.format import count_code_bytes, pack, unpack
from pgolf.quantize.stage import load_quantized


def hessian_main(argv):
    return cli_main(["hessians", *argv])


def quantize_main(argv):
    return cli_main(["quantize", *argv])


def pack_main(argv):
    return cli_main(["pack", "build", *argv])

CODE_ID = "7" * 64  # the code identity the artifact records (a bundle's CODE_HASH)
CODE = '''"""A stand-in for the bundled train_gpt.py."""
import sys


def main():
    # the counted code
    return len(sys.argv)
'''


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pack")
    data = write_shards(root / "shards")
    ckpt = train_checkpoint(data, root / "train")
    hessian_json = json.dumps(to_dict(HessianConfig(batches=2, batch_rows=2, seq_len=48)))
    assert (
        hessian_main(
            [
                "--checkpoint",
                str(ckpt),
                "--data-dir",
                str(data),
                "--seed",
                "1",
                "--mode",
                "sweep",
                "--hessian-json",
                hessian_json,
                "--device",
                "cpu",
                "--out",
                str(root / "hessians.pt"),
                "--report",
                str(root / "hr.json"),
            ]
        )
        == 0
    )
    quantize_json = json.dumps(
        to_dict(QuantizeConfig(passthrough_max_elements=1024, lqer_top_k=1, lqer_rank=2, lqer_group_size=16))
    )
    assert (
        quantize_main(
            [
                "--checkpoint",
                str(ckpt),
                "--hessians",
                str(root / "hessians.pt"),
                "--quantize-json",
                quantize_json,
                "--out",
                str(root / "quantized.pt"),
                "--report",
                str(root / "qr.json"),
            ]
        )
        == 0
    )
    (root / "train_gpt.py").write_text(CODE)
    return {
        "root": root,
        "checkpoint": ckpt,
        "quantized": root / "quantized.pt",
        "code": root / "train_gpt.py",
        "hessians": root / "hessians.pt",
    }


def _pack(chain, out_dir: Path, cfg: PackConfig | None = None, code: Path | None = None) -> int:
    return pack_main(
        [
            "--quantized",
            str(chain["quantized"]),
            "--checkpoint",
            str(chain["checkpoint"]),
            "--pack-json",
            json.dumps(to_dict(cfg or PackConfig())),
            "--code",
            str(code or chain["code"]),
            "--code-id",
            CODE_ID,
            "--out",
            str(out_dir / "artifact.pgolf"),
            "--report",
            str(out_dir / "pack_report.json"),
        ]
    )


@pytest.fixture(scope="module")
def packed(chain) -> Path:
    out = chain["root"] / "packed"
    assert _pack(chain, out) == 0
    return out


def test_artifact_carries_checkpoint_config_and_input_hashes(chain, packed) -> None:
    artifact = packed / "artifact.pgolf"
    report = json.loads((packed / "pack_report.json").read_text())
    qm, header = unpack(artifact.read_bytes())
    meta = read_checkpoint_meta(chain["checkpoint"])
    assert header["model_config"] == to_dict(TINY_MODEL) == meta["model_config"]
    hashes = header["input_hashes"]
    assert hashes["checkpoint_weights_sha256"] == meta["weights_sha256"]
    assert hashes["hessians_sha256"] == sha256_file(chain["hessians"])
    assert set(hashes) == {"checkpoint_weights_sha256", "hessians_sha256", "quantize_config_sha256"}
    assert report["code_hash"] == CODE_ID  # the identity of the counted code, reported beside its bytes
    assert report["input_hashes"] == hashes
    # what depends on a path, a time or the entry point is reported, never packed (it would move the model bytes)
    assert report["code_sha256"] == sha256_file(chain["code"]) and report["training_code_hash"] == meta["code_hash"]
    assert "data_manifest_sha256" in report
    # the dequantized artifact is the quantized model
    original, _ = load_quantized(chain["quantized"])
    a, b = dequantize_state(qm), dequantize_state(original)
    assert set(a) == set(load_checkpoint(chain["checkpoint"])[0]) and all(torch.equal(a[n], b[n]) for n in a)
    # entry digests are shortened as configured
    assert {len(e["sha256"]) for e in header["entries"]} == {PackConfig().sha256_hex_chars}


def test_report_sizes_and_headroom(chain, packed) -> None:
    report = json.loads((packed / "pack_report.json").read_text())
    artifact = packed / "artifact.pgolf"
    assert report["artifact_sha256"] == sha256_file(artifact)
    assert report["model_bytes"] == artifact.stat().st_size
    assert report["code_bytes"] == count_code_bytes(CODE, "wrapper") and report["code_bytes_convention"] == "wrapper"
    assert report["code_file_bytes"] == len(CODE.encode())
    assert report["total_bytes"] == report["model_bytes"] + report["code_bytes"]
    assert report["headroom_bytes"] == 16_000_000 - report["total_bytes"] and report["overage_bytes"] == 0
    assert report["compressor"] == "brotli" and report["ok"] is True
    # the baseline is brotli alone: the same model with row-major codes (the default stores them column-major)
    assert report["plain_brotli_model_bytes"] > 0
    assert report["gain_vs_plain_brotli_bytes"] == report["plain_brotli_model_bytes"] - report["model_bytes"]
    assert report["pack_seconds"] >= 0


def test_other_compressor_is_compared_with_plain_brotli(chain, tmp_path: Path) -> None:
    cfg = PackConfig(compressor="lzma", byte_shuffle=True, code_bytes_convention="file")
    assert _pack(chain, tmp_path, cfg) == 0
    report = json.loads((tmp_path / "pack_report.json").read_text())
    _, header = unpack((tmp_path / "artifact.pgolf").read_bytes())
    assert header["pack"] == {
        "compressor": "lzma", "byte_shuffle": True, "column_major_codes": True, "codes_coder": "rans",
    }
    qm, _ = load_quantized(chain["quantized"])
    plain = pack(
        qm, header["model_config"], header["input_hashes"], PackConfig(column_major_codes=False, codes_coder="compressor"),
        sha256_hex_chars=cfg.sha256_hex_chars,
    )
    assert report["plain_brotli_model_bytes"] == len(plain)
    assert report["gain_vs_plain_brotli_bytes"] == len(plain) - report["model_bytes"]
    assert report["code_bytes"] == len(CODE.encode()) and report["code_bytes_convention"] == "file"


def test_plain_brotli_comparison_can_be_skipped(chain, packed, tmp_path: Path) -> None:
    """``compare_plain_brotli: false``: no second compression, null comparison fields, the same artifact bytes."""
    assert _pack(chain, tmp_path, PackConfig(compare_plain_brotli=False)) == 0
    report = json.loads((tmp_path / "pack_report.json").read_text())
    assert report["plain_brotli_model_bytes"] is None and report["gain_vs_plain_brotli_bytes"] is None
    assert (tmp_path / "artifact.pgolf").read_bytes() == (packed / "artifact.pgolf").read_bytes()


def test_gate_refuses_over_the_cap_with_the_overage(chain, packed, tmp_path: Path, capsys) -> None:
    fitting = json.loads((packed / "pack_report.json").read_text())["total_bytes"]
    cap = fitting - 123
    assert _pack(chain, tmp_path, PackConfig(size_cap_bytes=cap)) == 3
    err = capsys.readouterr().err
    assert f"over the {cap:,}-byte cap by 123 bytes" in err
    assert not (tmp_path / "artifact.pgolf").exists()
    report = json.loads((tmp_path / "pack_report.json").read_text())
    assert report["ok"] is False and report["overage_bytes"] == 123 and report["artifact_sha256"] is None
    # exactly at the cap passes
    assert _pack(chain, tmp_path, PackConfig(size_cap_bytes=fitting)) == 0
    assert json.loads((tmp_path / "pack_report.json").read_text())["headroom_bytes"] == 0


def test_quantized_from_another_checkpoint_refused(chain, tmp_path: Path, capsys) -> None:
    state, meta = load_checkpoint(chain["checkpoint"])
    other = tmp_path / "other"
    save_checkpoint(
        other,
        {n: t + 1.0 for n, t in state.items()},
        {k: v for k, v in meta.items() if k not in ("format", "version", "weights_file", "weights_sha256", "tensors")},
    )
    status = pack_main(
        [
            "--quantized",
            str(chain["quantized"]),
            "--checkpoint",
            str(other),
            "--pack-json",
            "{}",
            "--code",
            str(chain["code"]),
            "--out",
            str(tmp_path / "a.pgolf"),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    assert status == 2 and "rerun the quantize stage" in capsys.readouterr().err
    assert not (tmp_path / "a.pgolf").exists()


def test_unparsable_code_file_named(chain, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("def f(:\n")
    assert _pack(chain, tmp_path, code=bad) == 2
    assert "broken.py: not valid Python" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- CLI


def test_inspect_lists_sections_config_hashes_and_tensors(chain, packed, capsys) -> None:
    artifact = packed / "artifact.pgolf"
    assert cli_main(["pack", "inspect", str(artifact), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    _, header = unpack(artifact.read_bytes())
    assert info["file_bytes"] == artifact.stat().st_size
    assert info["sections"]["prefix_bytes"] + info["sections"]["compressed_body_bytes"] == info["file_bytes"]
    assert info["sections"]["payload_bytes"] == sum(e["nbytes"] for e in header["entries"])
    assert info["entries"] == len(header["entries"])
    assert info["model_config"] == to_dict(TINY_MODEL) and info["input_hashes"] == header["input_hashes"]
    assert sum(v["tensors"] for v in info["tensors_by_method"].values()) == len(header["quantization"]["tensors"])
    assert cli_main(["pack", "inspect", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert "all hashes verified" in text and "blocks.1.mlp.up.weight" in text
    assert header["input_hashes"]["checkpoint_weights_sha256"] in text


def test_check_prints_the_counted_total(chain, packed, capsys) -> None:
    artifact = packed / "artifact.pgolf"
    report = json.loads((packed / "pack_report.json").read_text())
    assert cli_main(["pack", "check", str(artifact), "--code", str(chain["code"])]) == 0
    out = capsys.readouterr().out
    assert f"total bytes: {report['total_bytes']:,}" in out and "fits" in out
    file_total = report["model_bytes"] + len(CODE.encode())
    assert (
        cli_main(
            [
                "pack",
                "check",
                str(artifact),
                "--code",
                str(chain["code"]),
                "--convention",
                "file",
                "--cap",
                str(file_total - 1),
            ]
        )
        == 3
    )
    assert "by 1 bytes" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_check_refuses_a_damaged_artifact(chain, packed, tmp_path: Path, capsys, damage: str) -> None:
    data = bytearray((packed / "artifact.pgolf").read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:-10]
    bad = tmp_path / "bad.pgolf"
    bad.write_bytes(bytes(data))
    assert cli_main(["pack", "check", str(bad), "--code", str(chain["code"])]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err
