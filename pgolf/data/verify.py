"""The gate in front of training: is a shard directory well-formed, BOS-correct, leak-free and of the right size?

Every check reads the shards themselves, so the gate also works on exports downloaded from the Hub that carry
no pgolf manifest (the manifest cross-checks are then skipped and the report says so). The failures it looks
for are the ones seen in public submissions: shards without BOS (phased TTT divided by zero), 10,000 instead
of 50,000 validation documents (validation documents leaked into training), truncated downloads, and a byte
sidecar that counts bytes for BOS or CaseOps operator tokens.

Validation documents with an exact copy in the training shards (issue 15 item 7): a directory written by
``pgolf data prepare`` never has one (preparation drops or refuses them), so any there is a failure. A directory
without a pgolf manifest (a published export, used as published) may have a few: under the default
``val_duplicates_policy`` (``drop_train_copies``) they are accepted and counted in the report's summary, up to
``max_val_overlap_fraction`` of the validation documents; ``refuse`` accepts none. Above the threshold the
split itself is wrong (the #2127 mistake) and the check fails under either policy.

Memory stays bounded: shards are memory-mapped one at a time; only the validation doc hashes are kept.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pgolf.data.shards import (
    BOS_ID,
    CASEOPS_OPERATOR_IDS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SHARD_PREFIXES,
    iter_document_batches,
    doc_hashes,
    hashes_fingerprint,
    list_shards,
    read_header,
    read_shard,
    shard_index,
)
from pgolf.config.training import DEFAULT_MAX_VAL_OVERLAP_FRACTION, VAL_DUPLICATES_POLICIES, val_overlap_limit
from pgolf.io import read_json, sha256_file

RECORD_VAL_DOCS = 50_000  # rules: the first 50,000 documents of docs_selected.jsonl are the validation set
_MAX_LISTED = 5  # problems listed per check before "... and N more"
_OPERATOR_UTF8_BYTES = 3  # U+E001..U+E004 are three bytes in UTF-8


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclasses.dataclass
class Report:
    directory: str
    checks: list[Check] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def check(self, name: str) -> Check:
        """The check called ``name`` (KeyError if it was not run)."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check named {name!r}; have {', '.join(c.name for c in self.checks)}")

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name=name, ok=bool(ok), detail=detail))

    def to_dict(self) -> dict:
        return {
            "directory": self.directory,
            "ok": self.ok,
            "checks": [dataclasses.asdict(check) for check in self.checks],
            "summary": self.summary,
        }


def print_report(report: Report, file: TextIO | None = None) -> None:
    """One line per check (PASS/FAIL, name, detail), then a verdict line."""
    out = file or sys.stdout
    for check in report.checks:
        print(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}", file=out)
    failed = len(report.failed)
    verdict = "OK" if report.ok else f"FAILED ({failed} of {len(report.checks)} checks)"
    print(f"data verify {report.directory}: {verdict}", file=out)


def _listing(problems: list[str]) -> str:
    shown = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return shown + (f"; ... and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------------------------------------------
# Individual checks
# --------------------------------------------------------------------------------------------------------------


def _load_manifest(directory: Path, report: Report) -> dict | None:
    """The pgolf manifest, or None when absent or not ours (a downloaded export's own manifest)."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        report.add("manifest", True, f"no {MANIFEST_NAME}: file hashes and manifest totals not checked")
        return None
    try:
        manifest = read_json(path, "shard manifest")
    except ValueError as exc:
        report.add("manifest", False, str(exc))
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        report.add(
            "manifest",
            True,
            f"{path.name} is not a pgolf shard manifest (format {found!r}): file hashes and totals not checked",
        )
        return None
    expected_types = {
        "files": list,
        "settings": dict,
        "caseops": bool,
        "docs": dict,
        "tokens": dict,
        "fingerprints": dict,
    }
    wrong = [
        f"{key} (expected {kind.__name__})"
        for key, kind in expected_types.items()
        if not isinstance(manifest.get(key), kind)
    ]
    if wrong:
        report.add("manifest", False, f"{path}: missing or mistyped key(s) {', '.join(wrong)}")
        return None
    report.add("manifest", True, f"{path.name}: pgolf format version {manifest.get('version')}")
    return manifest


def _check_headers(shards: dict[str, list[Path]], report: Report) -> dict[str, bool]:
    """Validate every header against its file size; return, per kind, whether all its shards are readable."""
    problems: list[str] = []
    readable = {}
    total = 0
    for kind, paths in shards.items():
        readable[kind] = True
        for path in paths:
            total += 1
            try:
                read_header(path)
            except (ValueError, OSError) as exc:
                problems.append(str(exc))
                readable[kind] = False
    if problems:
        report.add("shard headers", False, _listing(problems))
    else:
        report.add("shard headers", True, f"{total} files: magic, version and size agree")
    return readable


def _check_presence(shards: dict[str, list[Path]], report: Report) -> None:
    problems = []
    for kind in ("val", "train"):
        if not shards[kind]:
            problems.append(f"no {SHARD_PREFIXES[kind]}*.bin files")
    for kind, paths in shards.items():
        indices = [shard_index(kind, path.name) for path in paths]
        if indices != list(range(len(indices))):
            gaps = sorted(set(range(max(indices) + 1)) - set(indices)) if indices else []
            problems.append(
                f"{SHARD_PREFIXES[kind]}*.bin indices not 0..{len(indices) - 1}: missing {gaps[:_MAX_LISTED]}"
            )
    counts = ", ".join(f"{len(paths)} {kind}" for kind, paths in shards.items())
    report.add("shard files", not problems, _listing(problems) if problems else counts)


def _check_manifest_files(directory: Path, manifest: dict, shards: dict[str, list[Path]], report: Report) -> None:
    """Every manifest file exists with its sha256 and token count; no shard file is missing from the manifest."""
    problems = []
    listed = set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict):
            problems.append(f"{MANIFEST_NAME}: a 'files' entry is {entry!r}, expected an object with name, tokens, "
                            "sha256")
            continue
        name = entry.get("name", "?")
        listed.add(name)
        path = directory / name
        if not path.exists():
            problems.append(f"{name}: listed in {MANIFEST_NAME} but missing")
            continue
        try:
            tokens = read_header(path).num_tokens
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if tokens != entry.get("tokens"):
            problems.append(f"{name}: {tokens} tokens, {MANIFEST_NAME} says {entry.get('tokens')}")
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            problems.append(f"{name}: sha256 {digest[:12]}..., {MANIFEST_NAME} says {str(entry.get('sha256'))[:12]}...")
    extra = sorted(path.name for paths in shards.values() for path in paths if path.name not in listed)
    if extra:
        problems.append(f"not in {MANIFEST_NAME}: {', '.join(extra[:_MAX_LISTED])}")
    ok = not problems
    report.add(
        "manifest files", ok, _listing(problems) if problems else f"{len(listed)} files: sha256 and token counts match"
    )


def _sketches(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Cheap vectorized pre-key per document: (length, first content token, last token) packed in uint64.

    Equal documents have equal sketches, so only train documents whose sketch matches a validation sketch need
    the full hash: the leak check runs at memory-map speed instead of one Python hash call per document.
    """
    lengths = np.minimum(ends - starts, 0xFFFFFFFF).astype(np.uint64)
    first = tokens[np.minimum(starts + 1, ends - 1)].astype(np.uint64)  # BOS itself for an empty document
    last = tokens[ends - 1].astype(np.uint64)
    return (lengths << np.uint64(32)) | (first << np.uint64(16)) | last


@dataclasses.dataclass
class _StreamStats:
    docs: int = 0
    tokens: int = 0
    error: str = ""


def _scan_val(paths: list[Path]) -> tuple[_StreamStats, np.ndarray, np.ndarray]:
    """Count validation documents and collect their hashes [docs] and sketches [docs]."""
    stats = _StreamStats(tokens=sum(read_header(path).num_tokens for path in paths))
    hashes, sketches = [], []
    try:
        for batch in iter_document_batches(paths, BOS_ID):
            hashes.append(doc_hashes(batch.tokens, batch.starts, batch.ends))
            sketches.append(_sketches(batch.tokens, batch.starts, batch.ends))
            stats.docs += len(batch)
    except ValueError as exc:
        stats.error = str(exc)
    empty = np.zeros(0, dtype=np.uint64)
    return stats, (np.concatenate(hashes) if hashes else empty), (np.concatenate(sketches) if sketches else empty)


@dataclasses.dataclass
class _Overlap:
    val_docs_in_train: int = 0  # distinct validation documents that also occur in training
    train_docs_matching: int = 0  # training documents equal to some validation document
    first: str = ""


def _scan_train(paths: list[Path], val_hashes: np.ndarray, val_sketches: np.ndarray) -> tuple[_StreamStats, _Overlap]:
    """Stream the training shards: count documents and find those equal (by doc hash) to a validation doc."""
    stats = _StreamStats(tokens=sum(read_header(path).num_tokens for path in paths))
    overlap = _Overlap()
    val_sketch_set = np.unique(val_sketches)
    val_hash_set = np.unique(val_hashes)
    matched: set[int] = set()
    try:
        for batch in iter_document_batches(paths, BOS_ID):
            stats.docs += len(batch)
            candidates = np.flatnonzero(np.isin(_sketches(batch.tokens, batch.starts, batch.ends), val_sketch_set))
            if not len(candidates):
                continue
            hashes = doc_hashes(batch.tokens, batch.starts[candidates], batch.ends[candidates])
            hits = np.isin(hashes, val_hash_set)
            if not hits.any():
                continue
            if not overlap.first:
                i = int(candidates[np.argmax(hits)])
                overlap.first = (
                    f"first at train doc {batch.first_doc + i} ({batch.path.name} token {int(batch.offsets[i])})"
                )
            overlap.train_docs_matching += int(hits.sum())
            matched.update(hashes[hits].tolist())
    except ValueError as exc:
        stats.error = str(exc)
    overlap.val_docs_in_train = len(matched)
    return stats, overlap


def _unescaped_operator_bytes(tokens: np.ndarray, counts: np.ndarray, prev_token: int, prev_count: int) -> np.ndarray:
    """Positions of CaseOps operator tokens [n] that count bytes although they are not an escaped literal.

    A literal operator character in the text is encoded as ESC + that character, and the second token then
    stands for the character's own 3 UTF-8 bytes; every other operator token counts 0. ``prev_*`` are the last
    token and count of the previous shard (a pair may straddle a shard boundary).
    """
    ops = np.array(CASEOPS_OPERATOR_IDS, dtype=np.uint16)
    esc = CASEOPS_OPERATOR_IDS[-1]
    before_tokens = np.concatenate([[prev_token], tokens[:-1]])  # [n]
    before_counts = np.concatenate([[prev_count], counts[:-1]])  # [n]
    escaped = (before_tokens == esc) & (before_counts == 0) & (counts == _OPERATOR_UTF8_BYTES)
    return np.flatnonzero(np.isin(tokens, ops) & (counts != 0) & ~escaped)


def _check_sidecar(val_paths: list[Path], byte_paths: list[Path], caseops: bool, report: Report) -> int | None:
    """Sidecar shard i has the length of val shard i and counts 0 bytes at BOS (and operators under CaseOps).

    Returns the total original bytes of the validation set, or None when there is no usable sidecar.
    """
    if len(byte_paths) != len(val_paths):
        report.add(
            "byte sidecar",
            False,
            f"{len(byte_paths)} {SHARD_PREFIXES['val_bytes']}*.bin files for {len(val_paths)} val shards",
        )
        return None
    problems = []
    total_bytes = 0
    prev_token, prev_count = BOS_ID, 0
    for val_path, byte_path in zip(val_paths, byte_paths):
        tokens, counts = read_shard(val_path), read_shard(byte_path)
        if len(tokens) != len(counts):
            problems.append(f"{byte_path.name}: {len(counts)} entries, {val_path.name} has {len(tokens)} tokens")
            prev_token, prev_count = BOS_ID, 0
            continue
        if not len(tokens):
            continue
        checks = [("BOS", np.flatnonzero((tokens == BOS_ID) & (counts != 0)))]
        if caseops:
            checks.append(("unescaped operator", _unescaped_operator_bytes(tokens, counts, prev_token, prev_count)))
        for label, bad in checks:
            if len(bad):
                where = int(bad[0])
                problems.append(
                    f"{byte_path.name}: {len(bad)} nonzero byte counts at {label} tokens, "
                    f"first at token {where} (count {int(counts[where])})"
                )
        total_bytes += int(counts.sum(dtype=np.int64))
        prev_token, prev_count = int(tokens[-1]), int(counts[-1])
    what = "BOS and unescaped operator tokens" if caseops else "BOS tokens"
    report.add(
        "byte sidecar",
        not problems,
        (
            _listing(problems)
            if problems
            else f"{len(byte_paths)} files, lengths match, 0 at {what}; {total_bytes:,} bytes"
        ),
    )
    return None if problems else total_bytes


def _check_val_count(found: int, expected_arg: int | None, manifest: dict | None, record: bool, report: Report) -> None:
    manifest_expected = manifest["settings"].get("val_docs") if manifest else None
    problems = []
    if record:
        if expected_arg is not None and expected_arg != RECORD_VAL_DOCS:
            problems.append(f"--record needs {RECORD_VAL_DOCS:,} validation docs; --val-docs says {expected_arg:,}")
        expected, source = RECORD_VAL_DOCS, "the record rule"
    elif expected_arg is not None:
        expected, source = expected_arg, "--val-docs"
    elif manifest_expected is not None:
        expected, source = manifest_expected, f"{MANIFEST_NAME} settings.val_docs"
    else:
        report.add("val doc count", True, f"{found:,} validation docs (no expected count given)")
        return
    if found != expected:
        problems.append(f"{found:,} validation docs, expected {expected:,} ({source})")
    report.add("val doc count", not problems, _listing(problems) if problems else f"{found:,} as expected ({source})")


def _check_manifest_totals(manifest: dict, summary: dict, report: Report) -> None:
    """The manifest's counts and validation fingerprint agree with what the shards contain."""
    problems = []
    pairs = [
        ("docs.val", manifest["docs"].get("val"), summary["val_docs"]),
        ("docs.train", manifest["docs"].get("train"), summary["train_docs"]),
        ("tokens.val", manifest["tokens"].get("val"), summary["val_tokens"]),
        ("tokens.train", manifest["tokens"].get("train"), summary["train_tokens"]),
        (
            "fingerprints.val_doc_hashes_sha256",
            manifest["fingerprints"].get("val_doc_hashes_sha256"),
            summary["val_doc_hashes_sha256"],
        ),
    ]
    if summary.get("val_bytes") is not None and "val_bytes" in manifest:
        pairs.append(("val_bytes", manifest["val_bytes"], summary["val_bytes"]))
    for key, claimed, found in pairs:
        if claimed != found:
            problems.append(f"{key}: {MANIFEST_NAME} says {claimed}, shards give {found}")
    if manifest["fingerprints"].get("train_val_overlap_docs") != 0:
        problems.append(
            f"fingerprints.train_val_overlap_docs is {manifest['fingerprints'].get('train_val_overlap_docs')}"
        )
    report.add(
        "manifest totals",
        not problems,
        _listing(problems) if problems else "doc/token counts and val fingerprint match",
    )


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def _check_overlap(
    overlap: _Overlap, train: _StreamStats, val_docs: int, prepared: bool, policy: str, max_fraction: float,
    report: Report,
) -> None:
    """Validation documents with a copy in the training shards: none in prepared data, few in an export."""
    limit = val_overlap_limit(val_docs, max_fraction)
    n = overlap.val_docs_in_train
    report.summary.update(
        train_val_overlap_docs=n, train_docs_matching_val=overlap.train_docs_matching, val_overlap_limit_docs=limit,
        val_duplicates_policy=policy,
    )
    if not n:
        report.add("train/val disjoint", not train.error, f"no validation document among {train.docs:,} train docs")
        return
    found = (
        f"{n} validation documents also occur in the training split ({overlap.train_docs_matching} train docs, "
        f"{n / max(val_docs, 1):.2%} of the validation docs), {overlap.first}"
    )
    if n > limit:
        why = f"more than max_val_overlap_fraction {max_fraction} allows ({limit}): the split itself is wrong"
    elif prepared:
        why = "a prepared directory holds none (prepare drops or refuses them): the shards were changed"
    elif policy == "refuse":
        why = "val_duplicates_policy is 'refuse'"
    else:
        report.add("train/val disjoint", True, f"accepted as published (no pgolf manifest; <= {limit}): {found}")
        return
    report.add("train/val disjoint", False, f"leak: {found}; {why}")


def verify_dir(
    directory: str | Path,
    expected_val_docs: int | None = None,
    record: bool = False,
    *,
    val_duplicates_policy: str = "drop_train_copies",
    max_val_overlap_fraction: float = DEFAULT_MAX_VAL_OVERLAP_FRACTION,
) -> Report:
    """Run every check on a shard directory; never raises for bad data (failures are reported checks).

    ``val_duplicates_policy`` and ``max_val_overlap_fraction``: the module docstring (and DataConfig).
    """
    if val_duplicates_policy not in VAL_DUPLICATES_POLICIES:
        got = val_duplicates_policy
        raise ValueError(f"val_duplicates_policy: expected one of {VAL_DUPLICATES_POLICIES}, got {got!r}")
    if not 0.0 <= max_val_overlap_fraction <= 1.0:
        raise ValueError(f"max_val_overlap_fraction: expected a fraction in [0, 1], got {max_val_overlap_fraction}")
    directory = Path(directory)
    report = Report(directory=str(directory))
    if not directory.is_dir():
        report.add("directory", False, f"{directory}: not a directory")
        return report
    manifest = _load_manifest(directory, report)
    shards = {kind: list_shards(directory, kind) for kind in ("val", "train", "val_bytes")}
    readable = _check_headers(shards, report)
    _check_presence(shards, report)
    if manifest is not None:
        _check_manifest_files(directory, manifest, shards, report)

    summary: dict[str, Any] = {"val_shards": len(shards["val"]), "train_shards": len(shards["train"])}
    report.summary = summary
    if not (readable["val"] and readable["train"] and shards["val"] and shards["train"]):
        report.add("documents", False, "skipped: val and train shards must exist and be readable")
        return report

    val, val_hashes, val_sketches = _scan_val(shards["val"])
    train, overlap = _scan_train(shards["train"], val_hashes, val_sketches)
    problems = [stats.error for stats in (val, train) if stats.error]
    report.add(
        "BOS per document",
        not problems,
        (
            _listing(problems)
            if problems
            else f"val and train streams start with BOS; {val.docs:,} val + {train.docs:,} train docs"
        ),
    )
    empty = [f"the {kind} shards hold no document" for kind, stats in (("val", val), ("train", train)) if not stats.docs]
    report.add("documents", not empty, _listing(empty) if empty else f"{val.docs:,} val and {train.docs:,} train docs")
    summary.update(
        val_docs=val.docs,
        train_docs=train.docs,
        val_tokens=val.tokens,
        train_tokens=train.tokens,
        val_duplicate_docs=int(len(val_hashes) - len(np.unique(val_hashes))),
        val_doc_hashes_sha256=hashes_fingerprint(val_hashes),
    )

    _check_overlap(
        overlap, train, val.docs, manifest is not None, val_duplicates_policy, max_val_overlap_fraction, report
    )
    if manifest is not None and isinstance(manifest.get("val_duplicates"), dict):
        summary["train_docs_dropped"] = manifest["val_duplicates"].get("train_docs_dropped")

    caseops = bool(manifest["caseops"]) if manifest is not None else bool(shards["val_bytes"])
    summary["caseops"] = caseops
    if shards["val_bytes"] or caseops:
        if not readable["val_bytes"]:
            report.add("byte sidecar", False, "unreadable sidecar shards (see shard headers)")
            summary["val_bytes"] = None
        else:
            summary["val_bytes"] = _check_sidecar(shards["val"], shards["val_bytes"], caseops, report)
    else:
        summary["val_bytes"] = None
        report.add("byte sidecar", True, "none (non-CaseOps data: bytes come from the tokenizer's lookup table)")

    _check_val_count(val.docs, expected_val_docs, manifest, record, report)
    if manifest is not None:
        _check_manifest_totals(manifest, summary, report)
    return report
