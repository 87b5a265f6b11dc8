"""Throughput of `pgolf data prepare` (JSONL -> shards + sidecar + manifest) in MB/s of raw document text.

Runs the real preparation end to end (reading, CaseOps, SentencePiece, byte counts, doc hashes, shard writes,
manifest) once per worker count on the same input, and checks that every run wrote identical shards.

    python benchmarks/tokenize_throughput.py --tokenizer MODEL [--docs DOCS.jsonl] [--workers 1 2 4] [--min-mb 8]

Without --docs the bundled sample corpus is used. The input is repeated (each copy's texts prefixed with the
copy number, so no document repeats: a repeat would be a train/val leak) until it holds at least --min-mb MB
of text.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_input(source: Path, target: Path, min_text_mb: float) -> tuple[int, int]:
    """Write copies of ``source`` to ``target`` until it holds ``min_text_mb`` MB of text -> (docs, text bytes)."""
    texts = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines()]
    if not texts:
        raise ValueError(f"{source}: no documents")
    docs = text_bytes = copy = 0
    with open(target, "w", encoding="utf-8") as handle:
        while text_bytes < min_text_mb * 1e6:
            for text in texts:
                text = f"[copy {copy}] {text}"
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                docs += 1
                text_bytes += len(text.encode("utf-8"))
            copy += 1
    return docs, text_bytes


def main(argv: list[str] | None = None) -> int:
    from pgolf.data.prepare import prepare_shards

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "data" / "sample" / "docs.jsonl")
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="SentencePiece .model (CaseOps unless --no-caseops)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--min-mb", type=float, default=8.0, help="repeat the input up to this many MB of text")
    parser.add_argument("--val-docs", type=int, default=1000)
    parser.add_argument("--no-caseops", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pgolf-bench-") as tmp_name:
        tmp = Path(tmp_name)
        docs_path = tmp / "docs.jsonl"
        n_docs, text_bytes = build_input(args.docs, docs_path, args.min_mb)
        print(f"input: {n_docs:,} docs, {text_bytes / 1e6:.2f} MB text ({args.docs.name} repeated)", flush=True)
        reference: dict[str, bytes] | None = None
        for workers in args.workers:
            out = tmp / f"shards_w{workers}"
            start = time.perf_counter()
            manifest = prepare_shards(
                docs_path=docs_path,
                tokenizer_path=args.tokenizer,
                out_dir=out,
                val_docs=args.val_docs,
                workers=workers,
                caseops=not args.no_caseops,
                progress=io.StringIO(),
            )
            seconds = time.perf_counter() - start
            tokens = manifest["tokens"]["val"] + manifest["tokens"]["train"]
            print(
                f"workers={workers}: {seconds:.2f} s, {text_bytes / 1e6 / seconds:.2f} MB/s text, "
                f"{tokens / seconds / 1e6:.3f} M tokens/s ({tokens:,} tokens)",
                flush=True,
            )
            files = {p.name: p.read_bytes() for p in sorted(out.glob("fineweb_*.bin"))}
            if reference is None:
                reference = files
            elif files != reference:
                print(f"workers={workers}: shards differ from the first run", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
