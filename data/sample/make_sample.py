"""Rebuild docs.jsonl, the bundled sample corpus, from Debian's `fortunes` package (BSD licence).

Usage (on a Debian machine): apt-get download fortunes && dpkg -x fortunes_*.deb x &&
    python data/sample/make_sample.py x/usr/share/games/fortunes data/sample/docs.jsonl

Each document is 1 to 6 consecutive fortunes of one file joined by blank lines; documents are then shuffled
with a fixed seed (like docs_selected.jsonl, whose order is a fixed shuffle). Deterministic.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

# Files left out: pictures made of characters, non-English text, and the collections of ethnic/gender jokes.
EXCLUDED = {"ascii-art", "art", "translate-me", "ethnic", "men-women", "drugs"}
SEED = 20240520


def fortunes_of(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="strict")
    return [chunk.strip("\n") for chunk in text.split("\n%\n") if chunk.strip()]


def main(src_dir: str, out_path: str) -> None:
    rng = random.Random(SEED)
    docs = []
    for path in sorted(Path(src_dir).iterdir()):
        if path.suffix or path.is_symlink() or path.name in EXCLUDED:
            continue
        items = fortunes_of(path)
        i = 0
        while i < len(items):
            n = rng.randint(1, 6)
            docs.append({"text": "\n\n".join(items[i : i + n]), "source": f"fortunes/{path.name}"})
            i += n
    rng.shuffle(docs)
    with open(out_path, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    print(f"{len(docs)} documents -> {out_path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
