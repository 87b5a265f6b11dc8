"""The layout is the architecture (docs/architecture.md): one subpackage per DAG stage, each with its own cli.py,
imports that only go down the stage order, no import cycles, no module too long to read in one pass, and
Snakemake rules that need no torchrun served by workflow/scripts/ adapters."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PGOLF = REPO / "pgolf"
STAGES = ("config", "data", "model", "train", "quantize", "artifact", "evaluate", "report", "compliance")
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "io.py", "bench.py"}
MAX_MODULE_LINES = 650

# What each subpackage may import (besides itself, pgolf.config and pgolf.io). Stages import only earlier stages;
# `compliance.provenance` (code identity) is a leaf that every stage may read; `artifact.record_run`, the
# single-process record run, is the one module that calls every stage (it is what the bundled train_gpt.py runs).
ALLOWED = {
    "config": set(),
    "data": set(),
    "model": set(),
    "train": {"data", "model", "compliance.provenance"},
    "quantize": {"data", "model", "train"},
    "artifact": {"model", "train", "quantize", "compliance.provenance"},
    "evaluate": {"data", "model", "train", "quantize", "artifact", "compliance.provenance"},
    # the one code counter (stdlib + brotli): the submission recounts train_gpt.py; the one record-hardware predicate
    "report": {"artifact.minify", "compliance.provenance"},
    "compliance": {"data", "model.attention"},  # preflight resolves the attention backend as the stages will
}
EXEMPT = {"pgolf.artifact.record_run"}
ENTRY_POINTS = {"__main__.py"}  # `python -m pgolf.<stage>` shims call pgolf.cli


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pgolf"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pgolf"))
    modules = {_module_name(p) for p in PGOLF.rglob("*.py")}
    return {name for name in found if name in modules}


def _modules() -> list[Path]:
    return sorted(p for p in PGOLF.rglob("*.py") if "__pycache__" not in p.parts)


def test_top_level_holds_only_what_every_stage_shares() -> None:
    assert {p.name for p in PGOLF.glob("*.py")} <= TOP_LEVEL
    packages = {p.name for p in PGOLF.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(STAGES)
    for stage in STAGES:
        assert (PGOLF / stage / "cli.py").is_file(), f"pgolf/{stage}/ has no cli.py"


def test_stage_cli_modules_are_collected_by_the_top_level_cli() -> None:
    from pgolf.cli import COMMAND_MODULES

    assert COMMAND_MODULES == tuple(f"pgolf.{stage}.cli" for stage in STAGES)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_stage_order(path: Path) -> None:
    name = _module_name(path)
    if name in EXEMPT or path.name in ENTRY_POINTS or path.parent == PGOLF:
        return
    stage = name.split(".")[1]
    allowed = ALLOWED[stage] | {stage, "config", "io"}
    for target in _imports(path, top_level_only=False):
        parts = target.split(".")
        if len(parts) < 2 or target == "pgolf.cli" and name.endswith(".cli"):
            continue
        other = parts[1]
        ok = other in allowed or ".".join(parts[1:3]) in allowed
        assert ok, f"{name} imports {target}: stage {stage!r} may import only {sorted(allowed)}"


def test_no_import_cycles_at_import_time() -> None:
    graph = {_module_name(p): _imports(p, top_level_only=True) for p in _modules()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_is_too_long_to_read_in_one_pass(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)}: {lines} lines (split it by what it holds)"


def test_rules_without_torchrun_use_script_adapters() -> None:
    rules = {}
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for match in re.finditer(r"^\s*rule (\w+):\n(.*?)(?=^\s*rule |\Z)", smk.read_text(), re.M | re.S):
            rules[match.group(1)] = match.group(2)
    assert rules, "no rules found"
    for name, body in rules.items():
        if "torchrun" in body:
            assert "shell:" in body, name
            continue
        script = re.search(r'script:\s*\n\s*"\.\./scripts/([\w.]+)"', body)
        assert script, f"rule {name}: expected a script: adapter in workflow/scripts/"
        assert (REPO / "workflow" / "scripts" / script.group(1)).is_file(), f"rule {name}: {script.group(1)} missing"


def test_cheap_commands_do_not_import_torch() -> None:
    code = "import sys\nfrom pgolf.cli import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "False"


def test_every_documented_python_m_command_runs_something() -> None:
    """A ``python -m pgolf.<module>`` in a docstring, the README, docs/ or the rules names a module that runs when
    executed (a ``__main__`` block, or a package with ``__main__.py``): one without does nothing and exits 0,
    which a user takes for a stage that ran. (Historical commands in docs/benchmarks.md are marked "as run then".)"""
    texts = [p.read_text(encoding="utf-8") for p in [*PGOLF.rglob("*.py"), REPO / "README.md", *(REPO / "docs").glob("*.md"),
                                                       *(REPO / "workflow").rglob("*.smk")]]
    named = {m for text in texts for m in re.findall(r"python -m (pgolf(?:\.\w+)+)", text)}
    historical = {"pgolf.train.bench"}  # docs/benchmarks.md, 2026-11-23, marked as run then
    silent = []
    for module in sorted(named - historical):
        path = REPO.joinpath(*module.split("."))
        if (path / "__main__.py").is_file():
            continue
        source = path.with_suffix(".py").read_text(encoding="utf-8") if path.with_suffix(".py").is_file() else ""
        if '__name__ == "__main__"' not in source:
            silent.append(module)
    assert not silent, f"documented as `python -m`, but running them does nothing: {silent}"
