"""The packed artifact (round trips, every refusal), the size gate, the minifier and the code wrapper."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import struct
import sys
import textwrap
import types

import pytest
import torch

from pgolf.config import PackConfig, QuantizeConfig
from pgolf.quantize.weights import QuantizedModel, QuantizedTensor, dequantize_state, quantize_state
from pgolf.artifact.cap import size_gate
from pgolf.artifact.format import (
    FORMAT_VERSION,
    MAGIC,
    PREFIX_BYTES,
    ArtifactError,
    check_against_model_config,
    check_compressor_available,
    count_code_bytes,
    make_wrapper,
    minify_source,
    pack,
    read_container,
    unpack,
    write_container,
)

MODEL_CONFIG = {"vocab_size": 64, "model_dim": 32, "num_layers": 1}
INPUT_HASHES = {"checkpoint": "ab" * 32, "config": "cd" * 32}


def _hessian(cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, cols, generator=g) @ torch.randn(cols, cols, generator=g)  # [n, cols]
    return X.T @ X / X.shape[0]


def _state_roles_hessians():
    g = torch.Generator().manual_seed(0)
    shapes_roles = {
        "emb.weight": ((64, 32), "embedding"),
        "blocks.0.attn.q.weight": ((32, 32), "attn"),
        "blocks.0.mlp.up.weight": ((70, 32), "mlp"),  # 70 rows: odd packed lengths
        "blocks.0.attn.gate.weight": ((4, 12), "attn_gate"),
        "blocks.0.scale": ((32,), "scalar"),
    }
    state = {n: torch.randn(*s, generator=g) * 0.05 for n, (s, _) in shapes_roles.items()}
    roles = {n: r for n, (_, r) in shapes_roles.items()}
    hessians = {n: _hessian(s[1], i) for i, (n, (s, r)) in enumerate(shapes_roles.items()) if len(s) == 2 and r != "attn_gate"}
    return state, roles, hessians


@pytest.fixture(scope="module")
def quantized() -> QuantizedModel:
    """A small quantized model with every method: GPTQ (+ asym LQER), RTN gate, fp16 passthrough."""
    state, roles, hessians = _state_roles_hessians()
    cfg = QuantizeConfig(attn_bits=3, mlp_bits=3, embed_bits=3, attn_clip_sigmas=2.5, mlp_clip_sigmas=2.5,
                         embed_clip_sigmas=2.5, lqer_top_k=2, lqer_rank=8, lqer_group_size=16)
    qm = quantize_state(state, roles, hessians, cfg)
    assert any(qt.lqer is not None for qt in qm.tensors.values()), "fixture must exercise LQER entries"
    return qm


def assert_same_model(a: QuantizedModel, b: QuantizedModel) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    assert a.quantize_config == b.quantize_config
    for name, qa in a.tensors.items():
        qb = b.tensors[name]
        assert (qa.role, qa.method, qa.shape, qa.bits, qa.clip_sigmas) == (qb.role, qb.method, qb.shape, qb.bits, qb.clip_sigmas)
        for field in ("q", "scale", "data"):
            ta, tb = getattr(qa, field), getattr(qb, field)
            assert (ta is None) == (tb is None), (name, field)
            if ta is not None:
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), (name, field)
        assert (qa.lqer is None) == (qb.lqer is None)
        if qa.lqer is not None:
            for field in dataclasses.fields(qa.lqer):
                va, vb = getattr(qa.lqer, field.name), getattr(qb.lqer, field.name)
                assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, (name, field.name)


CONFIGS = [
    PackConfig(compressor="brotli", brotli_quality=5),
    PackConfig(compressor="brotli", brotli_quality=5, byte_shuffle=True),
    PackConfig(compressor="lzma"),
    PackConfig(compressor="lzma", byte_shuffle=True),
    PackConfig(compressor="brotli", brotli_quality=5, column_major_codes=False, codes_coder="compressor"),
    PackConfig(compressor="brotli", brotli_quality=5, codes_coder="compressor"),
]


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "cfg", CONFIGS,
    ids=lambda c: f"{c.compressor}-shuffle{int(c.byte_shuffle)}-colmajor{int(c.column_major_codes)}-{c.codes_coder}",
)
def test_pack_round_trip_is_bit_exact(quantized, cfg):
    data = pack(quantized, MODEL_CONFIG, INPUT_HASHES, cfg)
    assert data[:8] == MAGIC and struct.unpack_from("<I", data, 8)[0] == FORMAT_VERSION
    loaded, header = unpack(data)
    assert_same_model(quantized, loaded)
    assert header["model_config"] == MODEL_CONFIG and header["input_hashes"] == INPUT_HASHES
    assert header["pack"]["compressor"] == cfg.compressor and header["pack"]["byte_shuffle"] == cfg.byte_shuffle
    assert header["pack"]["column_major_codes"] == cfg.column_major_codes
    assert header["pack"]["codes_coder"] == cfg.codes_coder and ("rans" in header) == (cfg.codes_coder == "rans")
    assert pack(loaded, header["model_config"], header["input_hashes"], cfg) == data
    original, restored = dequantize_state(quantized), dequantize_state(loaded)
    assert all(torch.equal(original[n], restored[n]) for n in original)


def test_byte_shuffle_marks_multibyte_entries_only(quantized):
    _, header = unpack(pack(quantized, MODEL_CONFIG, INPUT_HASHES, CONFIGS[1]))
    for entry in header["entries"]:
        name = entry["name"]
        expected = "rans" if name.endswith(":q") else "raw" if name.startswith("rans:") else (
            "shuffle" if entry["dtype"] == "float16" else "raw")
        assert entry["encoding"] == expected, entry["name"]


def test_column_major_codes_store_each_matrix_transposed(quantized):
    """The stored bytes of a ``q`` entry are its transpose's; everything else is stored as is."""
    header, payload = read_container(pack(quantized, MODEL_CONFIG, INPUT_HASHES, CONFIGS[5]))
    for entry in header["entries"]:
        name, part = entry["name"].split(":", 1)
        stored = payload[entry["offset"] : entry["offset"] + entry["nbytes"]]
        if part == "q":
            assert entry["encoding"] == "transpose"
            assert stored == quantized.tensors[name].q.T.contiguous().numpy().tobytes()
        else:
            assert entry["encoding"] == "raw", entry["name"]
    _, row_major = read_container(pack(quantized, MODEL_CONFIG, INPUT_HASHES, CONFIGS[4]))
    assert sorted(row_major) == sorted(payload) and row_major != payload  # same bytes, another order


def test_column_major_codes_compress_better_when_columns_differ():
    """Codes whose spread depends on the input feature (column), as GPTQ codes of trained weights do."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 512, 256
    column_spread = torch.exp(torch.randn(cols, generator=g))  # [cols]: one magnitude per input feature
    codes = (torch.randn(rows, cols, generator=g) * column_spread).round().clamp(-31, 31).to(torch.int8)
    qm = QuantizedModel(
        {"w": QuantizedTensor(role="mlp", method="rtn", shape=(rows, cols), bits=6, q=codes,
                              scale=torch.ones(rows, dtype=torch.float16))}, {}, [],
    )
    by_column = pack(qm, MODEL_CONFIG, INPUT_HASHES, PackConfig(brotli_quality=9, codes_coder="compressor"))
    by_row = pack(qm, MODEL_CONFIG, INPUT_HASHES,
                  PackConfig(brotli_quality=9, column_major_codes=False, codes_coder="compressor"))
    assert len(by_column) < 0.97 * len(by_row)
    assert torch.equal(unpack(by_column)[0].tensors["w"].q, codes)
    # rANS with per-column-class tables beats both (what the default ships)
    coded = pack(qm, MODEL_CONFIG, INPUT_HASHES, PackConfig(brotli_quality=9))
    assert len(coded) < len(by_column) and torch.equal(unpack(coded)[0].tensors["w"].q, codes)


def test_version_1_artifacts_are_still_read(quantized):
    """Version 1 (before the ``transpose`` and ``rans`` encodings) differs only in the version field."""
    v2 = pack(quantized, MODEL_CONFIG, INPUT_HASHES, CONFIGS[4])
    v1 = v2[:8] + struct.pack("<I", 1) + v2[12:]  # the body hash does not cover the version field
    assert_same_model(quantized, unpack(v1)[0])


def test_version_3_artifacts_are_still_read(quantized):
    """Version 4 added the LQER layout ``rowsym``; a version 3 artifact differs only in the version field."""
    v4 = pack(quantized, MODEL_CONFIG, INPUT_HASHES, CONFIGS[0])
    assert_same_model(quantized, unpack(v4[:8] + struct.pack("<I", 3) + v4[12:])[0])


@pytest.mark.parametrize("group,layout", [(16, "asym"), (48, "rowsym")])
def test_record_lqer_layouts_round_trip(group, layout):
    """lqer_mode asym (the record's codebook, always applied) in both of its layouts: 8 * 32 columns is a multiple
    of 16 (asym) but not of 48 (the record's per-row fallback, rowsym)."""
    state, roles, hessians = _state_roles_hessians()
    cfg = QuantizeConfig(attn_bits=3, mlp_bits=3, embed_bits=3, attn_clip_sigmas=2.5, mlp_clip_sigmas=2.5,
                         embed_clip_sigmas=2.5, lqer_mode="asym", lqer_top_k=2, lqer_rank=8, lqer_group_size=group,
                         lqer_keep_if_better=False)
    qm = quantize_state(state, roles, hessians, cfg)
    assert {qt.lqer.mode for qt in qm.tensors.values() if qt.lqer is not None} == {layout}
    loaded, _ = unpack(pack(qm, MODEL_CONFIG, INPUT_HASHES, PackConfig()))
    assert_same_model(qm, loaded)
    a, b = dequantize_state(qm), dequantize_state(loaded)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_tensor_table_tiles_the_payload(quantized):
    header, payload = read_container(pack(quantized, MODEL_CONFIG, INPUT_HASHES, CONFIGS[2]))
    offset = 0
    for entry in header["entries"]:
        assert entry["offset"] == offset
        offset += entry["nbytes"]
    assert offset == len(payload)
    names = {e["name"] for e in header["entries"]}
    assert "emb.weight:q" in names and "blocks.0.scale:data" in names
    assert any(n.endswith(":lqer.a_codes") for n in names)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def artifact(quantized) -> bytes:
    return pack(quantized, MODEL_CONFIG, INPUT_HASHES, CONFIGS[0])


def test_refuses_wrong_magic(artifact):
    with pytest.raises(ArtifactError, match="not a pgolf artifact"):
        unpack(b"NOTPGOLF" + artifact[8:])


def test_refuses_future_version(artifact):
    future = artifact[:8] + struct.pack("<I", 7) + artifact[12:]
    with pytest.raises(ArtifactError, match=r"artifact format version 7 is newer than this pgolf \(supports <= 4\)"):
        unpack(future)


@pytest.mark.parametrize("keep", [5, 30, PREFIX_BYTES + 10, -1])
def test_refuses_truncated(artifact, keep):
    with pytest.raises(ArtifactError, match="truncated"):
        unpack(artifact[:keep])


def test_refuses_corrupted_byte(artifact):
    damaged = bytearray(artifact)
    damaged[len(damaged) // 2] ^= 0x40
    with pytest.raises(ArtifactError, match="corrupted"):
        unpack(bytes(damaged))


def test_refuses_undecompressable_body(artifact):
    garbage = b"\xff" * 100
    data = artifact[:13] + hashlib.sha256(garbage).digest() + garbage  # valid prefix hash over garbage
    with pytest.raises(ArtifactError, match="does not decompress"):
        unpack(data)


def _reassemble(artifact: bytes, edit) -> bytes:
    """Decode a valid artifact, let ``edit(header, payload)`` damage it, re-encode a well-formed container."""
    header, payload = read_container(artifact)
    header, payload = edit(header, bytearray(payload))
    return write_container(header, bytes(payload), CONFIGS[0])


def test_refuses_entry_sha_mismatch(artifact):
    def flip(header, payload):
        payload[3] ^= 1
        return header, payload

    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        unpack(_reassemble(artifact, flip))


def test_refuses_table_that_does_not_tile_payload(artifact):
    def extra_tail(header, payload):
        return header, payload + b"\x00"

    def wrong_offset(header, payload):
        header["entries"][1]["offset"] += 1
        return header, payload

    def wrong_nbytes(header, payload):
        header["entries"][0]["nbytes"] -= 1
        return header, payload

    def past_end(header, payload):
        return header, payload[:-5]

    with pytest.raises(ArtifactError, match="entries cover"):
        unpack(_reassemble(artifact, extra_tail))
    with pytest.raises(ArtifactError, match="starts at"):
        unpack(_reassemble(artifact, wrong_offset))
    with pytest.raises(ArtifactError, match="records .* bytes but"):
        unpack(_reassemble(artifact, wrong_nbytes))
    with pytest.raises(ArtifactError, match="payload has"):
        unpack(_reassemble(artifact, past_end))


def test_refuses_a_table_of_wrong_types_or_impossible_sizes(artifact):
    """A foreign or hand-written table inside a valid container: named ArtifactErrors, never a TypeError from a
    dict lookup or an allocation of what an absurd shape claims."""
    def name_not_a_string(header, payload):
        header["entries"][0]["name"] = 5
        return header, payload

    def dtype_a_list(header, payload):
        header["entries"][0]["dtype"] = []
        return header, payload

    def absurd_shape(header, payload):
        header["entries"][0]["shape"] = [2**20, 2**20]
        return header, payload

    def negative_shape(header, payload):
        header["entries"][0]["shape"] = [-1, 4]
        return header, payload

    for change in (name_not_a_string, dtype_a_list):
        with pytest.raises(ArtifactError, match="name, dtype and encoding must be strings"):
            unpack(_reassemble(artifact, change))
    for change in (absurd_shape, negative_shape):
        with pytest.raises(ArtifactError, match=r"has shape .* \(at most 2,147,483,648 elements\)"):
            unpack(_reassemble(artifact, change))


def test_refuses_unknown_or_misapplied_encoding(artifact):
    def unknown(header, payload):
        header["entries"][0]["encoding"] = "zigzag"
        return header, payload

    def transpose_1d(header, payload):
        entry = next(e for e in header["entries"] if len(e["shape"]) == 1)
        entry["encoding"] = "transpose"
        return header, payload

    with pytest.raises(ArtifactError, match="unknown encoding 'zigzag'"):
        unpack(_reassemble(artifact, unknown))
    with pytest.raises(ArtifactError, match="encoding 'transpose' but its shape .* is not 2-D"):
        unpack(_reassemble(artifact, transpose_1d))


def test_refuses_inconsistent_rans_entries(artifact):
    def reorder(header, payload):
        header["rans"]["matrices"] = header["rans"]["matrices"][::-1]
        return header, payload

    def drop_section(header, payload):
        del header["rans"]
        return header, payload

    def wrong_code_sha(header, payload):
        entry = next(e for e in header["entries"] if e["encoding"] == "rans")
        entry["sha256"] = "0" * len(entry["sha256"])
        return header, payload

    def damaged_words(header, payload):  # a changed word with a matching entry digest: the decoder must notice
        entry = next(e for e in header["entries"] if e["name"] == "rans:words")
        start = entry["offset"] + entry["nbytes"] // 2
        payload[start] ^= 0x5A
        raw = bytes(payload[entry["offset"] : entry["offset"] + entry["nbytes"]])
        entry["sha256"] = hashlib.sha256(raw).hexdigest()[: len(entry["sha256"])]
        return header, payload

    with pytest.raises(ArtifactError, match="does not list the 'rans' entries in table order"):
        unpack(_reassemble(artifact, reorder))
    with pytest.raises(ArtifactError, match="no 'rans' section"):
        unpack(_reassemble(artifact, drop_section))
    with pytest.raises(ArtifactError, match="sha256 mismatch after rANS decoding"):
        unpack(_reassemble(artifact, wrong_code_sha))
    with pytest.raises(ArtifactError, match="do not decode|sha256 mismatch after rANS decoding"):
        unpack(_reassemble(artifact, damaged_words))


def test_refuses_table_that_disagrees_with_metadata(artifact):
    def drop_tensor_meta(header, payload):
        del header["quantization"]["tensors"]["blocks.0.scale"]
        return header, payload

    def wrong_meta_shape(header, payload):
        header["quantization"]["tensors"]["blocks.0.scale"]["shape"] = [31]
        return header, payload

    with pytest.raises(ArtifactError, match="unexpected entries blocks.0.scale:data"):
        unpack(_reassemble(artifact, drop_tensor_meta))
    with pytest.raises(ArtifactError, match=r"blocks.0.scale:data: stored as float16 \[32\], metadata implies float16 \[31\]"):
        unpack(_reassemble(artifact, wrong_meta_shape))


def test_refuses_header_values_the_reader_cannot_use(artifact):
    """Values only an edited header holds (the body's sha256 refuses plain corruption first): each an ArtifactError
    naming the source, not a ZeroDivisionError or AttributeError deeper down."""
    lqer_name = next(n for n, m in read_container(artifact)[0]["quantization"]["tensors"].items() if m.get("lqer"))

    def zero_group(header, payload):
        header["quantization"]["tensors"][lqer_name]["lqer"]["group_size"] = 0
        return header, payload

    def config_list(header, payload):
        header["quantization"]["config"] = [1]
        return header, payload

    def embed_dtype(header, payload):
        header["quantization"]["config"]["dequant_embed_dtype"] = "float8"
        return header, payload

    for edit, message in ((zero_group, f"LQER metadata of {lqer_name} is malformed .*group_size 0 must be >= 1"),
                          (config_list, "'quantization.config' must be an object"),
                          (embed_dtype, "dequant_embed_dtype is float32 or bfloat16, got .*float8")):
        with pytest.raises(ArtifactError, match=f"^seed7/artifact.pgolf: artifact header: .*{message}"):
            unpack(_reassemble(artifact, edit), "seed7/artifact.pgolf")



def test_a_one_dimensional_lqer_tensor_in_an_edited_header_is_an_artifact_error(artifact):
    """A fp16 tensor's metadata edited to carry LQER factors: an ArtifactError, not an IndexError from its shape."""
    name = next(n for n, m in read_container(artifact)[0]["quantization"]["tensors"].items() if len(m["shape"]) == 1)

    def lqer_on_a_vector(header, payload):
        header["quantization"]["tensors"][name]["lqer"] = {"mode": "asym", "rank": 1, "group_size": 1}
        return header, payload

    with pytest.raises(ArtifactError):
        unpack(_reassemble(artifact, lqer_on_a_vector))


def test_a_tensor_named_rans_round_trips():
    """The rANS coder's entries are rans:groups/freqs/states/words; a parameter named "rans" (entries "rans:data",
    "rans:q") is the model's, and reads back."""
    g = torch.Generator().manual_seed(3)
    state = {"rans": torch.randn(8, generator=g), "w": torch.randn(16, 32, generator=g)}
    qm = quantize_state(state, {"rans": "scalar", "w": "attn"}, {"w": torch.eye(32)}, QuantizeConfig())
    back, header = unpack(pack(qm, MODEL_CONFIG, INPUT_HASHES, PackConfig(codes_coder="rans")))
    assert "rans" in header and torch.equal(back.tensors["rans"].data, qm.tensors["rans"].data)


def test_pack_refuses_non_finite_weights_and_scales(quantized):
    """A NaN or inf entry would unpack into a model that scores NaN: refused when packing, naming the entry."""
    name = next(n for n, t in sorted(quantized.tensors.items()) if t.data is not None)
    bad = quantized.tensors[name].data.clone()
    bad.view(-1)[0] = float("inf")
    tensors = {**quantized.tensors, name: dataclasses.replace(quantized.tensors[name], data=bad)}
    with pytest.raises(ArtifactError, match=f"{name}:data: holds NaN or inf"):
        pack(dataclasses.replace(quantized, tensors=tensors), MODEL_CONFIG, INPUT_HASHES, PackConfig())


def test_check_against_model_config(artifact, quantized):
    _, header = unpack(artifact)
    expected = {name: qt.shape for name, qt in quantized.tensors.items()}
    check_against_model_config(header, expected)
    with pytest.raises(ArtifactError, match=r"^a.pgolf: does not match the model config its header states: emb.weight "
                                            r"has shape \[64, 32\], the model config implies \[128, 32\]"):
        check_against_model_config(header, dict(expected, **{"emb.weight": (128, 32)}), "a.pgolf")
    with pytest.raises(ArtifactError, match="missing blocks.1.mlp.up.weight"):
        check_against_model_config(header, dict(expected, **{"blocks.1.mlp.up.weight": (70, 32)}))
    reduced = dict(expected)
    del reduced["blocks.0.scale"]
    with pytest.raises(ArtifactError, match="not in the model blocks.0.scale"):
        check_against_model_config(header, reduced)


def test_lrzip_without_binary_is_refused_up_front(quantized, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no lrzip to find
    cfg = PackConfig(compressor="lrzip")
    with pytest.raises(ArtifactError, match="no `lrzip` binary is on PATH"):
        check_compressor_available(cfg)
    with pytest.raises(ArtifactError, match="lrzip"):
        pack(quantized, MODEL_CONFIG, INPUT_HASHES, cfg)


@pytest.mark.skipif(shutil.which("lrzip") is None, reason="lrzip binary not installed")
def test_lrzip_round_trip(quantized):
    data = pack(quantized, MODEL_CONFIG, INPUT_HASHES, PackConfig(compressor="lrzip"))
    loaded, _ = unpack(data)
    assert_same_model(quantized, loaded)


def test_lrzip_runs_with_a_pinned_thread_count(quantized, monkeypatch, tmp_path):
    """lrzip's output depends on its thread count (default: the machine's CPUs; measured here: -p 1 and -p 2 give
    other bytes for the same input), so pack pins it: the same weights give the same artifact on any machine. A
    stand-in lrzip on PATH records its arguments (and copies the bytes: no compression needed to see them)."""
    log = tmp_path / "args.txt"
    shim = tmp_path / "bin" / "lrzip"
    shim.parent.mkdir()
    shim.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import shutil, sys
        open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
        shutil.copyfile(sys.argv[-1], sys.argv[sys.argv.index("-o") + 1])
        """))
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}:{os.environ['PATH']}")
    loaded, _ = unpack(pack(quantized, MODEL_CONFIG, INPUT_HASHES, PackConfig(compressor="lrzip")))
    assert_same_model(quantized, loaded)
    compress, decompress = log.read_text().splitlines()
    assert compress.startswith("-z -L 9 -p 1 ") and decompress.startswith("-d ")

def test_short_entry_digests(quantized):
    cfg = CONFIGS[2]
    full = pack(quantized, MODEL_CONFIG, INPUT_HASHES, cfg)
    short = pack(quantized, MODEL_CONFIG, INPUT_HASHES, cfg, sha256_hex_chars=16)
    loaded, header = unpack(short)
    assert_same_model(quantized, loaded)
    assert all(len(e["sha256"]) == 16 for e in header["entries"])
    assert len(short) < len(full)
    with pytest.raises(ArtifactError, match="sha256_hex_chars"):
        pack(quantized, MODEL_CONFIG, INPUT_HASHES, cfg, sha256_hex_chars=8)

    def flip(header, payload):
        payload[-1] ^= 1
        return header, payload

    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        unpack(_reassemble(short, flip))


def test_pack_refuses_non_json_metadata(quantized):
    with pytest.raises(ArtifactError, match="not plain JSON"):
        pack(quantized, {"bad": object()}, INPUT_HASHES, CONFIGS[2])


# ---------------------------------------------------------------------------------------------- size gate


def test_size_gate_one_byte_over():
    result = size_gate(15_968_002, 31_999)
    assert result.total_bytes == 16_000_001 and not result.ok
    assert result.overage_bytes == 1 and result.headroom_bytes == 0
    assert "over the 16,000,000-byte cap by 1 bytes" in result.message
    with pytest.raises(ValueError, match="non-negative sizes and a positive cap"):
        size_gate(-1, 31_999)


def test_size_gate_exactly_at_and_under_cap():
    at_cap = size_gate(15_968_001, 31_999)
    assert at_cap.ok and at_cap.headroom_bytes == 0
    under = size_gate(15_875_551, 31_999)
    assert under.ok and under.headroom_bytes == 92_450 and "headroom 92,450 bytes" in under.message
    assert not size_gate(60, 50, cap=100).ok


# ---------------------------------------------------------------------------------------- code bytes


SAMPLE = textwrap.dedent(
    '''
    """A sample module: docstrings, comments, asserts, nesting, strings with significant whitespace."""
    from __future__ import annotations

    import math  # a comment

    POEM = """first line
        indented second line
      third"""


    class Accumulator:
        """Sums squares."""

        def __init__(self, start: float = 0.0) -> None:
            "docstring in a single-quoted string"
            assert start >= 0, "start must be >= 0"
            self.total = start

        def add(self, values):
            for v in values:
                if v < 0:
                    continue
                else:
                    ...
                self.total += v ** 2  # trailing comment
            return self


    def only_docstring():
        """Nothing else here."""


    def safe_mean(values):
        try:
            return sum(values) / len(values)
        except ZeroDivisionError:
            "a literal statement"
        finally:
            """another literal"""
        return math.nan


    def describe(x):
        table = {
            "a": [1, 2,
                  3],
            "tab\\there": x,
        }
        return f"{x!r:>6}|{POEM.splitlines()[1]}|{sorted(table)}"


    def run():
        acc = Accumulator(1.0).add([1, -2, 3])
        return (acc.total, only_docstring(), safe_mean([]), safe_mean([1, 2]), describe(3.5), POEM)
    '''
)


def _run_sample(code: str):
    namespace: dict = {"__name__": "sample"}
    exec(compile(code, "<sample>", "exec"), namespace)
    return repr(namespace["run"]())


def test_minified_source_compiles_and_behaves_the_same():
    minified = minify_source(SAMPLE)
    compile(minified, "<minified>", "exec")
    assert _run_sample(minified) == _run_sample(SAMPLE)
    assert "#" not in minified.replace("'#'", "")
    assert "Sums squares" not in minified and "assert" not in minified and "\n\n" not in minified
    assert all(len(line) - len(line.lstrip(" ")) <= 4 for line in minified.splitlines() if not line.startswith("    indented"))
    assert len(minified) < len(SAMPLE)
    assert minify_source(minified) == minified  # a fixed point


def test_minifier_drops_asserts():
    code = "def f(x):\n    assert x > 0\n    return x\n"
    namespace: dict = {}
    exec(minify_source(code), namespace)
    assert namespace["f"](-1) == -1


def test_wrapper_runs_and_is_counted():
    wrapper = make_wrapper(SAMPLE)
    assert wrapper.startswith('import brotli as B,base64 as b\nexec(B.decompress(b.b85decode("')
    assert wrapper.endswith('")))\n')
    assert _run_sample(wrapper) == _run_sample(SAMPLE)
    assert count_code_bytes(SAMPLE, "wrapper") == len(wrapper.encode("utf-8"))
    assert count_code_bytes(SAMPLE, "file") == len(SAMPLE.encode("utf-8"))
    assert count_code_bytes("x = 'é'\n", "file") == 9  # UTF-8 bytes, not characters
    with pytest.raises(ValueError, match="code_bytes_convention"):
        count_code_bytes(SAMPLE, "gzip")


def test_wrapper_shrinks_real_pgolf_source(monkeypatch):
    """On a real module of this repository the wrapper counts far fewer bytes than the file."""
    import pgolf.quantize.gptq

    source = open(pgolf.quantize.gptq.__file__, encoding="utf-8").read()
    assert count_code_bytes(source, "wrapper") < 0.5 * count_code_bytes(source, "file")
    # dataclasses look their module up in sys.modules, as they would for a shipped script run as __main__
    module = types.ModuleType("pgolf_gptq_minified")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(make_wrapper(source), module.__dict__)
    assert module.max_level(6) == 31
    W = torch.randn(8, 16)
    scale = module.sdclip_scales(W, 6, 13.0)
    assert torch.equal(module.rtn_quantize(W, scale, 6), pgolf.quantize.gptq.rtn_quantize(W, scale, 6))
