"""The packed artifact: a versioned, self-describing container for a quantized model, and the size gate.

Byte layout of format version 4 (all integers little-endian; also in docs/artifact-format.md)::

    offset  size  field
    0       8     magic b"PGOLFART"
    8       4     uint32 format version (4; versions 1 to 3, which lack the LQER layout ``rowsym`` (1-3), the ``rans``
                  (1, 2) and ``transpose`` (1) encodings, are still read)
    12      1     uint8 compressor id: 1 = brotli, 2 = lzma (raw LZMA2 stream), 3 = lrzip
    13      32    sha256 of the compressed body (bytes 45..end)
    45      ...   compressed body

    body (after decompression):
    0       4     uint32 H = length of the header JSON in bytes
    4       H     header JSON, UTF-8, canonical (sorted keys, no spaces)
    4+H     ...   payload: the tensor entries back to back, in table order, no padding

The header JSON holds ``model_config`` (the model section, so the evaluator builds the right model),
``input_hashes`` (provenance given by the caller: the pack stage gives the checkpoint weights, Hessians and quantize
config hashes, nothing path- or time-dependent), ``pack`` (compressor
settings), ``quantization`` (``config``: the quantize section; ``tensors``: per model tensor its role, method,
shape, bits, clip sigmas and LQER parameters) and ``entries``, the tensor table: one record per stored array
``{name, dtype, shape, encoding, offset, nbytes, sha256}``. ``offset`` counts from the start of the payload;
``nbytes = prod(shape) * itemsize`` (0 for ``rans`` entries); ``sha256`` is the hex sha256 (or a prefix of it,
16..64 characters) of the array's raw C-order little-endian bytes (before any encoding). ``encoding`` is ``"raw"``,
``"shuffle"`` (byte planes: all first bytes of the elements, then all second bytes, ...; used for multi-byte dtypes
when ``byte_shuffle`` is on, it lets the compressor see the slowly-varying high bytes of float16 together) or
``"transpose"`` (a 2-D array stored column by column, i.e. the C-order bytes of its transpose; used for the int8
codes when ``column_major_codes`` is on: the codes of one input feature are alike in magnitude, and brotli
compresses such runs ~1 % better than rows) or ``"rans"`` (``codes_coder: rans``, the default: the entry has no
bytes of its own, ``nbytes`` 0; all such matrices, in table order, are coded together by :mod:`pgolf.artifact.entropy` into
the entries ``rans:groups``, ``rans:freqs``, ``rans:states`` and ``rans:words``, described by the header's ``rans``
object ``{num_groups, lanes, precision_bits, matrices}``). Entry names are ``<tensor>:<part>`` with parts ``q``
(int8 codes), ``scale`` (float16 per row), ``data`` (float16 passthrough) and ``lqer.a_codes``, ``lqer.a_scales``,
``lqer.b_codes``, ``lqer.b_scales``.

Reading never unpickles anything: arrays are rebuilt with ``numpy.frombuffer`` from the table. Every
inconsistency is refused with a clear :class:`ArtifactError`: wrong magic, a format version from the future,
truncation or corruption (body sha256, decompression failure, per-entry sha256, a rANS stream that does not
decode back to its initial lane states), a tensor table that does not tile the payload or does not match the quantization metadata, and (``check_against_model_config``) tensor
shapes that differ from what the model config implies.

The per-tensor quantization report is not stored (it would cost bytes); the caller writes it beside the artifact.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pgolf.config import PackConfig
from pgolf.artifact.entropy import PRECISION_BITS, CodedMatrices, EntropyCodingError, decode_matrices, encode_matrices
from pgolf.quantize.lqer import LqerFactors, lqer_factor_shapes
from pgolf.quantize.weights import QuantizedModel, QuantizedTensor
from pgolf.artifact.minify import count_code_bytes, make_wrapper, minify_source  # noqa: F401  (part of this module's API)

MAGIC = b"PGOLFART"
FORMAT_VERSION = 4  # 4: LQER layout rowsym (the record's per-row fallback)
_PREFIX = struct.Struct("<8sIB32s")  # magic, version, compressor id, sha256 of the compressed body
PREFIX_BYTES = _PREFIX.size  # 45
COMPRESSOR_IDS = {"brotli": 1, "lzma": 2, "lrzip": 3}
MIN_SHA256_HEX_CHARS = 16  # shortest per-entry digest prefix the reader accepts
MAX_ENTRY_ELEMENTS = 2**31  # per tensor: far above any model that fits the cap, far below what a table could claim
BROTLI_LGWIN = 24  # largest standard window (16 MiB): the whole model fits in one window
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

# numpy little-endian dtype per stored dtype name
_DTYPES = {"int8": np.dtype("i1"), "uint8": np.dtype("u1"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4"),
           "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # the last two: the rANS arrays only
RANS_PARTS = {"groups": "uint8", "freqs": "uint16", "states": "uint32", "words": "uint16"}  # entries "rans:<part>"
RANS_ENTRIES = frozenset(f"rans:{part}" for part in RANS_PARTS)  # a tensor named "rans" has entries "rans:q", ...
_TORCH_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
_PART_ORDER = ("q", "data", "scale", "lqer.a_codes", "lqer.a_scales", "lqer.b_codes", "lqer.b_scales")


class ArtifactError(ValueError):
    """The artifact cannot be written or read as asked (bad bytes, inconsistent table, missing compressor)."""


# --------------------------------------------------------------------------------------------------------------
# Compressors
# --------------------------------------------------------------------------------------------------------------


def check_compressor_available(cfg: PackConfig) -> None:
    """Fail up front (before hours of work are packed) if the configured compressor cannot run here."""
    if cfg.compressor == "brotli":
        try:
            import brotli  # noqa: F401
        except ImportError:
            raise ArtifactError("pack.compressor: 'brotli' requested but the brotli Python package is not installed") from None
    elif cfg.compressor == "lrzip":
        if shutil.which("lrzip") is None:
            raise ArtifactError(
                "pack.compressor: 'lrzip' requested but no `lrzip` binary is on PATH; install lrzip or use brotli/lzma"
            )
    elif cfg.compressor != "lzma":
        raise ArtifactError(f"pack.compressor: unknown compressor {cfg.compressor!r}")


def _lrzip(args: list[str], data: bytes, suffix_in: str, suffix_out: str) -> bytes:
    if shutil.which("lrzip") is None:
        raise ArtifactError("this artifact is lrzip-compressed but no `lrzip` binary is on PATH")
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        src, dst = Path(tmp) / f"in{suffix_in}", Path(tmp) / f"out{suffix_out}"
        src.write_bytes(data)
        proc = subprocess.run(["lrzip", *args, "-q", "-f", "-o", str(dst), str(src)], capture_output=True)
        if proc.returncode != 0:
            raise ArtifactError(f"lrzip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
        return dst.read_bytes()


def _compress(body: bytes, cfg: PackConfig) -> bytes:
    if cfg.compressor == "brotli":
        import brotli

        return brotli.compress(body, quality=cfg.brotli_quality, lgwin=BROTLI_LGWIN)
    if cfg.compressor == "lzma":
        return lzma.compress(body, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if cfg.compressor == "lrzip":
        # ZPAQ back end, strongest level, one thread: lrzip splits its input by thread count, which defaults to the
        # machine's CPU count (1 and 2 threads give other bytes), so an unpinned count makes the artifact machine-dependent
        return _lrzip(["-z", "-L", "9", "-p", "1"], body, ".bin", ".lrz")
    raise ArtifactError(f"pack.compressor: unknown compressor {cfg.compressor!r}")


def _decompress(compressed: bytes, compressor_id: int) -> bytes:
    try:
        if compressor_id == COMPRESSOR_IDS["brotli"]:
            try:
                import brotli
            except ImportError:
                raise ArtifactError("this artifact is brotli-compressed but the brotli package is not installed") from None
            return brotli.decompress(compressed)
        if compressor_id == COMPRESSOR_IDS["lzma"]:
            return lzma.decompress(compressed, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        if compressor_id == COMPRESSOR_IDS["lrzip"]:
            return _lrzip(["-d"], compressed, ".lrz", ".bin")
    except ArtifactError:
        raise
    except Exception as exc:  # brotli.error, lzma.LZMAError: the bytes are damaged
        raise ArtifactError(f"artifact body does not decompress (truncated or corrupted): {exc}") from None
    raise ArtifactError(f"unknown compressor id {compressor_id} (known: {COMPRESSOR_IDS})")


# --------------------------------------------------------------------------------------------------------------
# The container: prefix + compressed (header JSON + payload)
# --------------------------------------------------------------------------------------------------------------


def write_container(header: dict, payload: bytes, cfg: PackConfig) -> bytes:
    """Assemble the bytes of an artifact from a header dict and its payload (no consistency checks)."""
    check_compressor_available(cfg)
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body = struct.pack("<I", len(header_bytes)) + header_bytes + payload
    compressed = _compress(body, cfg)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, COMPRESSOR_IDS[cfg.compressor], hashlib.sha256(compressed).digest())
    return prefix + compressed


def read_container(data: bytes) -> tuple[dict, bytes]:
    """Check the prefix, verify and decompress the body; return ``(header dict, payload bytes)``."""
    if len(data) < 12:
        raise ArtifactError(f"artifact truncated: {len(data)} bytes, the fixed prefix alone is {PREFIX_BYTES}")
    if data[:8] != MAGIC:
        raise ArtifactError(f"not a pgolf artifact: magic {bytes(data[:8])!r}, expected {MAGIC!r}")
    (version,) = struct.unpack_from("<I", data, 8)
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {version} is newer than this pgolf (supports <= {FORMAT_VERSION})"
        )
    if version < 1:
        raise ArtifactError(f"artifact format version {version} is invalid (versions start at 1)")
    if len(data) < PREFIX_BYTES:
        raise ArtifactError(f"artifact truncated: {len(data)} bytes, the fixed prefix alone is {PREFIX_BYTES}")
    _, _, compressor_id, body_sha = _PREFIX.unpack_from(data, 0)
    compressed = bytes(data[PREFIX_BYTES:])
    actual = hashlib.sha256(compressed).digest()
    if actual != body_sha:
        raise ArtifactError(
            f"artifact truncated or corrupted: sha256 of the {len(compressed):,}-byte body is {actual.hex()[:16]}..., "
            f"the prefix records {body_sha.hex()[:16]}..."
        )
    body = _decompress(compressed, compressor_id)
    if len(body) < 4:
        raise ArtifactError("artifact body too short to hold its header length")
    (header_len,) = struct.unpack_from("<I", body, 0)
    if 4 + header_len > len(body):
        raise ArtifactError(f"artifact header length {header_len:,} exceeds the body ({len(body) - 4:,} bytes)")
    try:
        header = json.loads(body[4 : 4 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"artifact header: expected a JSON object, got {type(header).__name__}")
    return header, body[4 + header_len :]


# --------------------------------------------------------------------------------------------------------------
# Tensors <-> entries
# --------------------------------------------------------------------------------------------------------------


def _dtype_name(t: torch.Tensor) -> str:
    for name, dtype in _TORCH_DTYPES.items():
        if t.dtype == dtype:
            return name
    raise ArtifactError(f"cannot store dtype {t.dtype} (allowed: {', '.join(_TORCH_DTYPES)})")


def _raw_bytes(t: torch.Tensor) -> bytes:
    """C-order little-endian bytes of a tensor."""
    array = t.detach().cpu().contiguous().numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _shuffle(raw: bytes, itemsize: int) -> bytes:
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(stored: bytes, itemsize: int) -> bytes:
    return np.frombuffer(stored, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def _transpose(raw: bytes, shape: list[int], itemsize: int) -> bytes:
    """C-order bytes of a 2-D array ``shape`` -> the C-order bytes of its transpose (column by column)."""
    rows, cols = shape
    return np.frombuffer(raw, dtype=np.dtype(f"V{itemsize}")).reshape(rows, cols).T.tobytes()


def _untranspose(stored: bytes, shape: list[int], itemsize: int) -> bytes:
    rows, cols = shape
    return np.frombuffer(stored, dtype=np.dtype(f"V{itemsize}")).reshape(cols, rows).T.tobytes()


def _encoding_for(part: str, t: torch.Tensor, cfg: PackConfig) -> str:
    if cfg.codes_coder == "rans" and part == "q" and t.ndim == 2:
        return "rans"
    if cfg.column_major_codes and part == "q" and t.ndim == 2:
        return "transpose"
    if cfg.byte_shuffle and t.element_size() > 1:
        return "shuffle"
    return "raw"


def _encode(raw: bytes, encoding: str, shape: list[int], itemsize: int) -> bytes:
    if encoding == "shuffle":
        return _shuffle(raw, itemsize)
    if encoding == "transpose":
        return _transpose(raw, shape, itemsize)
    return raw


def _decode(stored: bytes, encoding: str, shape: list[int], itemsize: int) -> bytes:
    if encoding == "shuffle":
        return _unshuffle(stored, itemsize)
    if encoding == "transpose":
        return _untranspose(stored, shape, itemsize)
    return stored


def _tensor_parts(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    parts: dict[str, Optional[torch.Tensor]] = {"q": qt.q, "scale": qt.scale, "data": qt.data}
    if qt.lqer is not None:
        for field in ("a_codes", "a_scales", "b_codes", "b_scales"):
            parts[f"lqer.{field}"] = getattr(qt.lqer, field)
    return {k: v for k, v in parts.items() if v is not None}


def _tensor_meta(qt: QuantizedTensor) -> dict:
    lqer = None
    if qt.lqer is not None:
        lqer = {"mode": qt.lqer.mode, "rank": qt.lqer.rank, "group_size": qt.lqer.group_size}
    return {
        "role": qt.role, "method": qt.method, "shape": list(qt.shape), "bits": qt.bits,
        "clip_sigmas": qt.clip_sigmas, "lqer": lqer,
    }


def _expected_parts(name: str, meta: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """part -> (dtype name, shape) that a tensor with this metadata must store."""
    try:
        method, shape = meta["method"], tuple(int(d) for d in meta["shape"])
        lqer = meta.get("lqer")
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"artifact header: quantization metadata of {name} is malformed ({exc!r})") from None
    if method in ("gptq", "rtn"):
        if len(shape) != 2:
            raise ArtifactError(f"artifact header: {name} is {method} but its shape {list(shape)} is not 2-D")
        parts = {"q": ("int8", shape), "scale": ("float16", (shape[0],))}
        if lqer is not None:
            try:
                rank, group_size = int(lqer["rank"]), int(lqer["group_size"])
                if rank < 1 or group_size < 1:
                    raise ValueError(f"rank {rank} and group_size {group_size} must be >= 1")
                factor_shapes = lqer_factor_shapes(lqer["mode"], shape, rank, group_size)
            except (KeyError, TypeError, ValueError) as exc:
                raise ArtifactError(f"artifact header: LQER metadata of {name} is malformed ({exc})") from None
            for field, fshape in factor_shapes.items():
                parts[f"lqer.{field}"] = ("uint8" if field.endswith("codes") else "float16", fshape)
        return parts
    if method == "fp16":
        return {"data": ("float16", shape)}
    raise ArtifactError(f"artifact header: {name} has unknown quantization method {method!r}")


def pack(
    quantized: QuantizedModel, model_config: dict, input_hashes: dict, cfg: PackConfig, sha256_hex_chars: int = 64
) -> bytes:
    """Serialize and compress a quantized model into artifact bytes (deterministic for equal inputs).

    ``sha256_hex_chars`` keeps only a prefix of each entry's hex digest: the full 64 characters cost about
    32 incompressible bytes per entry (~6.4 KB for the record's ~200 entries); 16 still catches any accidental
    corruption. The reader accepts any prefix length in [16, 64].
    """
    if not MIN_SHA256_HEX_CHARS <= sha256_hex_chars <= 64:
        raise ArtifactError(f"sha256_hex_chars: expected {MIN_SHA256_HEX_CHARS}..64, got {sha256_hex_chars}")
    check_compressor_available(cfg)
    entries_by_part: list[tuple[int, str, torch.Tensor]] = []
    tensors_meta = {}
    for name, qt in sorted(quantized.tensors.items()):
        if ":" in name:
            raise ArtifactError(f"tensor name {name!r} contains ':', which separates entry parts")
        tensors_meta[name] = _tensor_meta(qt)
        expected = _expected_parts(name, tensors_meta[name])
        parts = _tensor_parts(qt)
        if set(parts) != set(expected):
            raise ArtifactError(f"{name}: stores parts {sorted(parts)}, its metadata implies {sorted(expected)}")
        for part, t in parts.items():
            dtype, shape = expected[part]
            if _dtype_name(t) != dtype or tuple(t.shape) != shape:
                raise ArtifactError(f"{name}:{part}: {_dtype_name(t)} {list(t.shape)}, expected {dtype} {list(shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{name}:{part}: holds NaN or inf values; an artifact stores finite weights and scales only")
            entries_by_part.append((_PART_ORDER.index(part), f"{name}:{part}", t))

    entries, chunks, offset = [], [], 0

    def add(name: str, dtype: str, shape: list[int], encoding: str, raw: bytes, stored: bytes) -> None:
        nonlocal offset
        entries.append({
            "name": name, "dtype": dtype, "shape": shape, "encoding": encoding, "offset": offset,
            "nbytes": len(stored), "sha256": hashlib.sha256(raw).hexdigest()[:sha256_hex_chars],
        })
        chunks.append(stored)
        offset += len(stored)

    rans_names, rans_matrices = [], []
    for part_index, entry_name, t in sorted(entries_by_part, key=lambda e: (e[0], e[1])):
        raw = _raw_bytes(t)
        encoding = _encoding_for(_PART_ORDER[part_index], t, cfg)
        if encoding == "rans":  # coded below, with every other code matrix; no bytes of its own
            rans_names.append(entry_name)
            rans_matrices.append(t.detach().cpu().contiguous().numpy())
            add(entry_name, _dtype_name(t), list(t.shape), encoding, raw, b"")
            continue
        add(entry_name, _dtype_name(t), list(t.shape), encoding, raw, _encode(raw, encoding, list(t.shape), t.element_size()))
    rans_meta = None
    if rans_names:
        coded = encode_matrices(rans_matrices, cfg.rans_column_groups)
        for part, dtype in RANS_PARTS.items():
            array = np.ascontiguousarray(getattr(coded, part), dtype=_DTYPES[dtype])
            add(f"rans:{part}", dtype, list(array.shape), "raw", array.tobytes(), array.tobytes())
        rans_meta = {"num_groups": coded.num_groups, "lanes": len(coded.states), "precision_bits": PRECISION_BITS,
                     "matrices": rans_names}

    pack_meta: dict[str, Any] = {
        "compressor": cfg.compressor, "byte_shuffle": cfg.byte_shuffle, "column_major_codes": cfg.column_major_codes,
        "codes_coder": cfg.codes_coder,
    }
    if cfg.compressor == "brotli":
        pack_meta["brotli_quality"] = cfg.brotli_quality
    header = {
        "model_config": model_config,
        "input_hashes": input_hashes,
        "pack": pack_meta,
        "quantization": {"config": quantized.quantize_config, "tensors": tensors_meta},
        "entries": entries,
    }
    if rans_meta is not None:
        header["rans"] = rans_meta
    try:
        json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"artifact header is not plain JSON (model_config / input_hashes?): {exc}") from None
    return write_container(header, b"".join(chunks), cfg)


def _read_entries(header: dict, payload: bytes) -> dict[str, torch.Tensor]:
    """Validate the tensor table against the payload and decode every entry (``rans`` ones via the rANS entries)."""
    entries = header.get("entries")
    if not isinstance(entries, list):
        raise ArtifactError("artifact header: 'entries' (the tensor table) is missing or not a list")
    arrays: dict[str, Optional[np.ndarray]] = {}  # None: a "rans" entry, decoded after the loop
    digests: dict[str, tuple[str, str, list[int]]] = {}  # rans entry -> (sha256 prefix, dtype, shape)
    expected_offset = 0
    for i, e in enumerate(entries):
        try:
            name, dtype, shape = e["name"], e["dtype"], [int(d) for d in e["shape"]]
            encoding, offset, nbytes, sha = e["encoding"], int(e["offset"]), int(e["nbytes"]), e["sha256"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"tensor table entry {i} is malformed ({exc!r})") from None
        if not all(isinstance(v, str) for v in (name, dtype, encoding)):
            raise ArtifactError(f"tensor table entry {i}: name, dtype and encoding must be strings")
        if any(d < 0 for d in shape) or math.prod(shape) > MAX_ENTRY_ELEMENTS:  # before anything is allocated
            raise ArtifactError(f"tensor table: {name} has shape {shape} (at most {MAX_ENTRY_ELEMENTS:,} elements)")
        if name in arrays:
            raise ArtifactError(f"tensor table: duplicate entry {name}")
        if dtype not in _DTYPES:
            raise ArtifactError(f"tensor table: {name} has unknown dtype {dtype!r} (known: {', '.join(_DTYPES)})")
        if encoding not in ("raw", "shuffle", "transpose", "rans"):
            raise ArtifactError(f"tensor table: {name} has unknown encoding {encoding!r}")
        if encoding in ("transpose", "rans") and len(shape) != 2:
            raise ArtifactError(f"tensor table: {name} has encoding {encoding!r} but its shape {shape} is not 2-D")
        if encoding == "rans" and dtype != "int8":
            raise ArtifactError(f"tensor table: {name} has encoding 'rans' but dtype {dtype} (only int8 codes are)")
        itemsize = _DTYPES[dtype].itemsize
        needed = 0 if encoding == "rans" else math.prod(shape) * itemsize  # a rans entry's bytes live elsewhere
        if nbytes != needed:
            raise ArtifactError(f"tensor table: {name} records {nbytes} bytes but {dtype} {shape} needs {needed}")
        if offset != expected_offset:
            raise ArtifactError(f"tensor table does not match the payload: {name} starts at {offset}, expected {expected_offset}")
        if offset + nbytes > len(payload):
            raise ArtifactError(f"tensor table does not match the payload: {name} ends at {offset + nbytes}, payload has {len(payload)} bytes")
        if not (isinstance(sha, str) and MIN_SHA256_HEX_CHARS <= len(sha) <= 64):
            raise ArtifactError(f"tensor table: {name} has a malformed sha256 {sha!r}")
        expected_offset = offset + nbytes
        if encoding == "rans":
            arrays[name] = None
            digests[name] = (sha, dtype, shape)
            continue
        raw = _decode(payload[offset : offset + nbytes], encoding, shape, itemsize)
        if hashlib.sha256(raw).hexdigest()[: len(sha)] != sha:
            raise ArtifactError(f"tensor {name}: sha256 mismatch (corrupted payload or tensor table)")
        arrays[name] = np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape)
    if expected_offset != len(payload):
        raise ArtifactError(f"tensor table does not match the payload: entries cover {expected_offset} of {len(payload)} bytes")
    if digests:
        _decode_rans_entries(header, arrays, digests)
    elif "rans" in header:
        raise ArtifactError("artifact header: a 'rans' section but no entry with encoding 'rans'")
    out = {}
    for name, array in arrays.items():
        if name in RANS_ENTRIES:
            continue  # consumed by the decoder
        out[name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    return out


def _decode_rans_entries(header: dict, arrays: dict, digests: dict) -> None:
    """Fill the ``rans`` entries of ``arrays`` from the rANS entries; checks names, order and every sha256."""
    meta = header.get("rans")
    if not isinstance(meta, dict):
        raise ArtifactError("artifact header: entries with encoding 'rans' but no 'rans' section")
    try:
        num_groups, lanes, precision = int(meta["num_groups"]), int(meta["lanes"]), int(meta["precision_bits"])
        names = [str(n) for n in meta["matrices"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"artifact header: 'rans' section is malformed ({exc!r})") from None
    if names != list(digests):
        raise ArtifactError("artifact header: 'rans.matrices' does not list the 'rans' entries in table order")
    if precision != PRECISION_BITS:
        raise ArtifactError(f"artifact header: rANS precision {precision} bits, this pgolf decodes {PRECISION_BITS}")
    parts = {}
    for part, dtype in RANS_PARTS.items():
        array = arrays.get(f"rans:{part}")
        if array is None or array.dtype != _DTYPES[dtype] or array.ndim != (2 if part == "freqs" else 1):
            raise ArtifactError(f"tensor table: entry rans:{part} ({dtype}) is missing or malformed")
        parts[part] = array
    if len(parts["states"]) != lanes:
        raise ArtifactError(f"rans:states holds {len(parts['states'])} lanes, the header says {lanes}")
    shapes = [tuple(digests[n][2]) for n in names]
    try:
        matrices = decode_matrices(CodedMatrices(num_groups, **parts), shapes)
    except EntropyCodingError as exc:
        raise ArtifactError(f"rANS-coded matrices do not decode (corrupted artifact): {exc}") from None
    for name, matrix in zip(names, matrices):
        sha = digests[name][0]
        if hashlib.sha256(matrix.tobytes()).hexdigest()[: len(sha)] != sha:
            raise ArtifactError(f"tensor {name}: sha256 mismatch after rANS decoding (corrupted artifact)")
        arrays[name] = matrix


def unpack(data: bytes, source: str = "artifact") -> tuple[QuantizedModel, dict]:
    """Read artifact bytes back into a :class:`QuantizedModel` (empty report) and the header dict; a refusal
    names ``source`` (the file the bytes came from)."""
    try:
        return _unpack(data)
    except ArtifactError as exc:
        raise ArtifactError(f"{source}: {exc}") from None


def _unpack(data: bytes) -> tuple[QuantizedModel, dict]:
    header, payload = read_container(data)
    arrays = _read_entries(header, payload)
    quant = header.get("quantization")
    if not isinstance(quant, dict) or not isinstance(quant.get("tensors"), dict):
        raise ArtifactError("artifact header: 'quantization.tensors' is missing")
    config = quant.get("config", {})
    embed_dtype = config.get("dequant_embed_dtype", "float32") if isinstance(config, dict) else None
    if embed_dtype not in ("float32", "bfloat16"):  # the dequantizer reads it (pgolf.quantize.weights)
        raise ArtifactError(f"artifact header: 'quantization.config' must be an object whose dequant_embed_dtype is "
                            f"float32 or bfloat16, got {config!r:.200}")
    tensors: dict[str, QuantizedTensor] = {}
    used: set[str] = set()
    for name, meta in sorted(quant["tensors"].items()):
        expected = _expected_parts(name, meta)
        parts = {}
        for part, (dtype, shape) in expected.items():
            key = f"{name}:{part}"
            if key not in arrays:
                raise ArtifactError(f"tensor table does not match the quantization metadata: {key} is missing")
            t = arrays[key]
            if _dtype_name(t) != dtype or tuple(t.shape) != shape:
                raise ArtifactError(f"{key}: stored as {_dtype_name(t)} {list(t.shape)}, metadata implies {dtype} {list(shape)}")
            parts[part] = t
            used.add(key)
        shape = tuple(int(d) for d in meta["shape"])
        try:
            lqer = None
            if meta.get("lqer") is not None:
                lq = meta["lqer"]
                lqer = LqerFactors(
                    str(lq["mode"]), (shape[0], shape[1]), int(lq["rank"]), int(lq["group_size"]),
                    parts["lqer.a_codes"], parts["lqer.a_scales"], parts["lqer.b_codes"], parts["lqer.b_scales"],
                )
            clip = meta.get("clip_sigmas")
            tensors[name] = QuantizedTensor(
                role=str(meta["role"]), method=str(meta["method"]), shape=shape, bits=int(meta["bits"]),
                clip_sigmas=None if clip is None else float(clip), q=parts.get("q"), scale=parts.get("scale"),
                data=parts.get("data"), lqer=lqer,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactError(f"artifact header: quantization metadata of {name} is malformed ({exc!r})") from None
    orphans = sorted(set(arrays) - used)  # the rANS entries were consumed by _read_entries
    if orphans:
        raise ArtifactError(f"tensor table does not match the quantization metadata: unexpected entries {', '.join(orphans)}")
    return QuantizedModel(tensors, config, []), header


def check_against_model_config(header: dict, expected_shapes: dict[str, tuple], source: str = "artifact") -> None:
    """Refuse an artifact whose tensors differ from what the model config implies (names and shapes); errors
    start with ``source`` (the artifact's path)."""
    try:
        stored = {name: tuple(meta["shape"]) for name, meta in header["quantization"]["tensors"].items()}
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{source}: header: cannot read tensor shapes ({exc!r})") from None
    expected = {name: tuple(shape) for name, shape in expected_shapes.items()}
    problems = []
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"not in the model {', '.join(extra)}")
    for name in sorted(set(stored) & set(expected)):
        if stored[name] != expected[name]:
            problems.append(f"{name} has shape {list(stored[name])}, the model config implies {list(expected[name])}")
    if problems:
        raise ArtifactError(f"{source}: does not match the model config its header states: " + "; ".join(problems))
