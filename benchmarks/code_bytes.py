"""Counted code of each recipe's shipped ``train_gpt.py``, and where its bytes go (issue 15).

    python benchmarks/code_bytes.py config.yaml recipes/smoke.yaml [--modules N] [--json OUT]
    python benchmarks/code_bytes.py --record-script ../shared/reference/pr1855/train_gpt.py [--modules N]

For each recipe: the shipped bundle (``pgolf bundle --minify-modules`` and the bundle rule: the shipped recipe,
built in memory), its length, its counted
bytes under the ``wrapper`` convention (``pgolf.artifact.minify.counted_code``, the one counter), the same wrapper
around ``pyminify`` 3.x's output under rules.md's options when ``pyminify`` is on PATH, and the module count. With
``--modules N``: the N embedded modules that cost most, each as its marginal brotli bytes (all embedded sources
compressed together, minus the same without that module: what dropping it would save before base85's 5/4) and
its brotli bytes alone. With ``--record-script``: the same marginals over the record script's top-level definitions
(docstrings dropped, ``ast.unparse``d, as the wrapper counter reads code): what each part of the record costs,
the budget a leaner record path is measured against (issue 15). Why a script here: the code-size tables in
docs/benchmarks.md must be reproducible from the repository.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import brotli

from pgolf.artifact.bundle import build_bundle, shipped_recipe
from pgolf.artifact.minify import WRAPPER_HEAD, WRAPPER_TAIL, counted_code
from pgolf.config import load_run_config

# rules.md: the top records' counting
PYMINIFY_OPTIONS = ["--no-rename-locals", "--no-hoist-literals", "--remove-literal-statements", "--remove-asserts",
                    "--prefer-single-line"]


def brotli_bytes(text: str) -> int:
    return len(brotli.compress(text.encode("utf-8"), quality=11))


def pyminify_wrapper_bytes(text: str) -> int | None:
    """The wrapper's length around ``pyminify``'s output, or None without pyminify on PATH."""
    exe = shutil.which("pyminify")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="pgolf-code-bytes-") as tmp:
        path = Path(tmp) / "train_gpt.py"
        path.write_text(text, encoding="utf-8")
        minified = subprocess.run([exe, *PYMINIFY_OPTIONS, str(path)], capture_output=True, check=True).stdout
    payload = base64.b85encode(brotli.compress(minified, quality=11)).decode("ascii")
    return len((WRAPPER_HEAD + payload + WRAPPER_TAIL).encode("utf-8"))


def module_marginals(sources: dict[str, str]) -> list[dict]:
    """Per embedded module: brotli bytes of all sources minus all but it, and its own brotli bytes; largest first."""
    names = sorted(sources)
    everything = brotli_bytes("".join(sources[n] for n in names))
    rows = []
    for name in names:
        rest = brotli_bytes("".join(sources[n] for n in names if n != name))
        rows.append({"module": name, "marginal_brotli_bytes": everything - rest,
                     "alone_brotli_bytes": brotli_bytes(sources[name]), "raw_bytes": len(sources[name])})
    return sorted(rows, key=lambda r: (-r["marginal_brotli_bytes"], r["module"]))


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def record_parts(script: Path) -> dict[str, str]:
    """The record script's top-level statements by name (definitions by their names, other statements numbered),
    docstrings dropped, each ``ast.unparse``d."""
    tree = _without_docstrings(ast.parse(script.read_text(encoding="utf-8")))
    parts = {}
    for i, node in enumerate(tree.body):
        name = getattr(node, "name", None) or f"{type(node).__name__.lower()}@{i}"
        parts[name if name not in parts else f"{name}@{i}"] = ast.unparse(node)
    return parts


def measure(recipe: str, modules: int) -> dict:
    bundle = build_bundle(shipped_recipe(load_run_config(recipe)), minify=True)  # what `pgolf bundle` writes
    data = bundle.text.encode("utf-8")
    counted, raw, sha = counted_code(data, "wrapper", recipe)
    out = {"recipe": recipe, "file_bytes": raw, "wrapper_bytes": counted, "sha256": sha,
           "pyminify_wrapper_bytes": pyminify_wrapper_bytes(bundle.text), "modules": len(bundle.modules)}
    if modules > 0:
        out["costliest_modules"] = module_marginals({m.name: m.source for m in bundle.modules})[:modules]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipe YAML files")
    parser.add_argument("--record-script", type=Path, help="the record's train_gpt.py: its parts' marginals")
    parser.add_argument("--modules", type=int, default=0, help="list the N costliest embedded modules")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if not args.recipes and args.record_script is None:
        parser.error("give recipes, --record-script, or both")
    results = [measure(recipe, args.modules) for recipe in args.recipes]
    for r in results:
        pymin = "n/a (no pyminify)" if r["pyminify_wrapper_bytes"] is None else f"{r['pyminify_wrapper_bytes']:,}"
        print(f"{r['recipe']}: file {r['file_bytes']:,}, wrapper {r['wrapper_bytes']:,}, pyminify wrapper {pymin}, "
              f"{r['modules']} modules")
        for row in r.get("costliest_modules", []):
            print(f"  {row['marginal_brotli_bytes']:6,d} marginal  {row['alone_brotli_bytes']:6,d} alone  "
                  f"{row['raw_bytes']:7,d} raw  {row['module']}")
    if args.record_script is not None:
        parts = record_parts(args.record_script)
        everything = brotli_bytes("".join(parts[n] for n in sorted(parts)))
        rows = module_marginals(parts)[: args.modules or len(parts)]
        print(f"{args.record_script}: {len(parts)} top-level parts, {everything:,} brotli bytes together")
        for row in rows:
            print(f"  {row['marginal_brotli_bytes']:6,d} marginal  {row['alone_brotli_bytes']:6,d} alone  "
                  f"{row['raw_bytes']:7,d} raw  {row['module']}")
        results.append({"record_script": str(args.record_script), "brotli_bytes": everything, "parts": rows})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
