"""Build a docs.jsonl corpus from the text found on this machine, for GPU runs where FineWeb cannot be downloaded.

    python benchmarks/local_corpus.py --out corpus.jsonl --max-mb 200 ROOT [ROOT ...]

The device machines have no network, so runs that need real text (a briefly trained record-size model for the pack
size, TTT on real documents, the 8-GPU reproduction) use the prose and code installed here instead: HTML manuals
(tags stripped), man pages (roff requests stripped), Markdown/reStructuredText/plain text and Python sources. One
file is one document (long files are cut at paragraph boundaries into documents of at most ``--max-doc-chars``);
exact duplicates are dropped; the order is shuffled with ``--seed`` so that the validation split (the first
documents, as `pgolf data prepare --val-docs` takes them) is a random sample. The text is NOT FineWeb: scores are
not comparable with the challenge's, while times, sizes and throughput are.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = {".md", ".rst", ".txt", ".py"}
_SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_BLANK_RUNS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_SPACE_RUNS = re.compile(r"[ \t]+")
_ROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\[&\-e]|\\s[-+]?\d")


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page: scripts, styles and tags removed, entities decoded, blank runs collapsed."""
    text = _TAG.sub(" ", _SCRIPT_OR_STYLE.sub(" ", markup))
    text = html.unescape(text)
    lines = [_SPACE_RUNS.sub(" ", line).strip() for line in text.splitlines()]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def roff_to_text(source: str) -> str:
    """Readable text of a man page: request lines (``.XX``) and comments dropped, font escapes removed."""
    kept = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            # macro arguments of headings/paragraph tags are text (.SH NAME, .B word); the rest are requests
            head, _, rest = line.partition(" ")
            if head in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".IP", ".TP") and rest:
                kept.append(rest.replace('"', ""))
            continue
        kept.append(line)
    return _BLANK_RUNS.sub("\n\n", _ROFF_ESCAPE.sub("", "\n".join(kept))).strip()


def read_document(path: Path) -> str | None:
    """The text of one file, or None when it is not a text format this corpus takes (or not UTF-8)."""
    name = path.name
    try:
        if name.endswith(".gz"):
            if "/man" not in str(path):
                return None
            return roff_to_text(gzip.decompress(path.read_bytes()).decode("utf-8"))
        if name.endswith((".html", ".htm")):
            return html_to_text(path.read_text(encoding="utf-8"))
        if path.suffix in TEXT_SUFFIXES:
            return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError, EOFError, gzip.BadGzipFile):
        return None
    return None


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at paragraph boundaries into pieces of at most ``max_chars`` (a paragraph longer is cut hard)."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for paragraph in text.split("\n\n"):
        while len(paragraph) > max_chars:
            pieces.append(paragraph[:max_chars])
            paragraph = paragraph[max_chars:]
        if current and len(current) + 2 + len(paragraph) > max_chars:
            pieces.append(current)
            current = paragraph
        else:
            current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        pieces.append(current)
    return pieces


def walk_files(roots: list[Path]) -> Iterator[Path]:
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in sorted(names):
                yield Path(directory, name)


def collect(roots: list[Path], max_bytes: int, min_chars: int, max_doc_chars: int) -> list[str]:
    """Documents from each root in turn, each root taking at most an equal share of ``max_bytes`` (no one source,
    e.g. thousands of near-identical generated man pages, dominates)."""
    seen: set[bytes] = set()
    docs: list[str] = []
    for root in roots:
        docs += _collect_root(root, max_bytes // len(roots), min_chars, max_doc_chars, seen)
    return docs


def _collect_root(root: Path, max_bytes: int, min_chars: int, max_doc_chars: int, seen: set[bytes]) -> list[str]:
    docs: list[str] = []
    total = 0
    for path in walk_files([root]):
        text = read_document(path)
        if text is None or len(text) < min_chars:
            continue
        for piece in split_long(text, max_doc_chars):
            digest = hashlib.blake2b(piece.encode("utf-8"), digest_size=16).digest()
            if len(piece) < min_chars or digest in seen:
                continue
            seen.add(digest)
            docs.append(piece)
            total += len(piece.encode("utf-8"))
            if total >= max_bytes:
                return docs
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="directories to read")
    parser.add_argument("--out", required=True, type=Path, help="docs.jsonl to write")
    parser.add_argument("--max-mb", type=float, default=200.0, help="stop after this many MB of UTF-8 text")
    parser.add_argument("--min-chars", type=int, default=200)
    parser.add_argument("--max-doc-chars", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing:
        sys.exit(f"local_corpus: not a directory: {', '.join(missing)}")
    docs = collect(args.roots, int(args.max_mb * 1e6), args.min_chars, args.max_doc_chars)
    random.Random(args.seed).shuffle(docs)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    size = sum(len(t.encode("utf-8")) for t in docs)
    print(f"wrote {len(docs):,} documents, {size / 1e6:.1f} MB of text, to {args.out}")


if __name__ == "__main__":
    main()
