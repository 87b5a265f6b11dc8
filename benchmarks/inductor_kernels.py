"""The source of the costliest inductor-generated kernels of a profiled run, with the model ops each one fuses.

A profile names kernels such as ``triton_per_fused__fused_rms_norm__fused_rms_norm_backward_..._34``; what they read
and write is in the code inductor generated for the compiled graphs, kept in its cache directory. This script
finds each top kernel of one or more profiles there and writes, per kernel: its GPU time, the graph it belongs to
(``# AOT ID``: forward / backward of which compile), inductor's comment naming the ATen ops it fuses, and its Triton
source. That is what issue 16 asks to compare ("find every extra read and write of the residual stream").

    # after `pgolf bench train ... --profile-steps N --out bench.json` with TORCHINDUCTOR_CACHE_DIR=DIR:
    python benchmarks/inductor_kernels.py --cache DIR --profile bench.json --out kernels.md
    # the record script's run (shared/reference/side_by_side.sh record): inductor's default cache, anchor_profile.json
    python benchmarks/inductor_kernels.py --cache /tmp/torchinductor_root --profile OUT/anchor_profile.json --out r.md

Profiles: pgolf's bench JSON (``phases[].profile.top_kernels``) or the record's ``anchor_profile.json``
(``windows{}.top_kernels``). Kernel names carry a per-graph counter, so one name can match kernels of several
graphs (looping off and on compile separately); every match is written, each with its graph's id.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# one kernel in a generated graph module: NAME = async_compile.triton('NAME', '''SOURCE''', ...)
KERNEL_RE = re.compile(r"^(?P<name>\w+) = async_compile\.triton\('(?P=name)', '''(?P<source>.*?)'''", re.M | re.S)
AOT_ID_RE = re.compile(r"^# AOT ID: (.*)$", re.M)


def top_kernels(profile: dict) -> list[tuple[str, str, float]]:
    """(run label, kernel name, ms per step) of every top kernel in a bench JSON or an anchor_profile.json."""
    found = []
    for phase in profile.get("phases", []):
        label = "looping " + ("on" if phase.get("looping") else "off")
        for k in (phase.get("profile") or {}).get("top_kernels") or []:
            found.append((label, k["name"], float(k["ms_per_step"])))
    for window, w in (profile.get("windows") or {}).items():
        for k in w.get("top_kernels") or []:
            found.append((window, k["name"], float(k["ms_per_step"])))
    return found


def comment_above(text: str, start: int) -> str:
    """The block of ``#`` lines right above offset ``start`` (inductor's source-node comment)."""
    lines = text[:start].rstrip("\n").split("\n")
    block = []
    while lines and lines[-1].startswith("#"):
        block.append(lines.pop())
    return "\n".join(reversed(block))


def index_cache(cache: Path) -> dict[str, list[dict]]:
    """kernel name -> [{graph, file, comment, source}] over every generated graph module under ``cache``."""
    index: dict[str, list[dict]] = {}
    for path in sorted(cache.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if "async_compile.triton(" not in text:
            continue
        graph = AOT_ID_RE.search(text)
        for m in KERNEL_RE.finditer(text):
            index.setdefault(m.group("name"), []).append({
                "graph": graph.group(1) if graph else "?", "file": str(path.relative_to(cache)),
                "comment": comment_above(text, m.start()), "source": m.group("source").strip("\n"),
            })
    return index


# The profilers (pgolf.model.device, the record harness's profile_anchor.py) keep the first 160 characters of a
# kernel's name: a name that long may be the start of a longer one in the cache.
PROFILE_NAME_CHARS = 160


def kernel_sources(index: dict[str, list], name: str) -> list:
    """The cache entries of a profiled kernel ``name``: exact, or by prefix when the profiler cut the name."""
    if name in index or len(name) < PROFILE_NAME_CHARS:
        return index.get(name, [])
    return [m for full, entries in index.items() if full.startswith(name) for m in entries]


def report(profiles: list[Path], cache: Path, top: int) -> tuple[str, int]:
    """The markdown report and the number of top inductor kernels whose source was not found."""
    index = index_cache(cache)
    out, missing = [f"# Inductor kernels: {', '.join(str(p) for p in profiles)} (cache {cache})\n"], 0
    for path in profiles:
        kernels = [k for k in top_kernels(json.loads(path.read_text())) if k[1].startswith("triton_")]
        runs: dict[str, list] = {}
        for label, name, ms in kernels:
            runs.setdefault(label, []).append((name, ms))
        for label, entries in runs.items():
            out.append(f"## {path.name}, {label}\n")
            for name, ms in entries[:top]:
                matches = kernel_sources(index, name)
                out.append(f"### {ms:.1f} ms/step  `{name}` ({len(matches)} match(es))\n")
                if not matches:
                    missing += 1
                    out.append("source not found in the cache (another cache directory, or an evicted entry)\n")
                for m in matches:
                    out.append(f"graph {m['graph']}, {m['file']}\n\n```\n{m['comment']}\n{m['source']}\n```\n")
    return "\n".join(out), missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="inductor's cache directory (TORCHINDUCTOR_CACHE_DIR)")
    parser.add_argument("--profile", type=Path, nargs="+", required=True, help="bench JSON or anchor_profile.json")
    parser.add_argument("--out", type=Path, required=True, help="markdown report")
    parser.add_argument("--top", type=int, default=8, help="inductor kernels per run (default 8)")
    args = parser.parse_args(argv)
    if not args.cache.is_dir():
        sys.exit(f"inductor_kernels: --cache {args.cache}: not a directory")
    text, missing = report(args.profile, args.cache, args.top)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"inductor_kernels: {args.out} ({len(text):,} chars; {missing} kernel(s) without source)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
