"""benchmarks/code_bytes.py: the counted code it prints is the bundle's own count, and its per-module marginals."""

import importlib.util
from pathlib import Path

from pgolf.artifact.bundle import bundle_report, shipped_recipe
from pgolf.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("code_bytes", ROOT / "benchmarks" / "code_bytes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tool_counts_what_pgolf_bundle_reports(monkeypatch, shipped_form):
    """The tool builds the bundle `pgolf bundle` writes (the shipped recipe, minified: its call is asserted) and
    counts it as the bundle's report does. Its build_bundle is the session's ``shipped_form`` (tests/conftest.py:
    the same function, built once for this recipe), and the reference is the report of that bundle: seconds of
    shrinking once for the session instead of twice here."""
    tool = _tool()
    recipe = str(ROOT / "recipes" / "smoke.yaml")
    calls = []

    def build(*args, **kwargs):
        calls.append((args, kwargs))
        return shipped_form(*args)

    monkeypatch.setattr(tool, "build_bundle", build)
    got = tool.measure(recipe, modules=0)
    cfg = shipped_recipe(load_run_config(recipe))
    assert calls == [((cfg,), {"minify": True})]
    report = bundle_report(shipped_form(cfg), minify=True)
    assert (got["file_bytes"], got["wrapper_bytes"]) == (report["bytes_file"], report["bytes_wrapper"])
    assert got["sha256"] == report["sha256"] and got["modules"] == len(report["modules"])


def test_module_marginals_rank_what_each_module_adds():
    tool = _tool()
    unique = "".join(f"v{i} = {i * 7919 % 10007}\n" for i in range(400))  # little to share with the others
    sources = {"a": "x = 1\n" * 50, "b": unique, "c": "x = 1\n" * 49 + "y = 2\n"}
    rows = tool.module_marginals(sources)
    assert [r["module"] for r in rows][0] == "b"  # the incompressible one costs most
    by_name = {r["module"]: r for r in rows}
    assert by_name["c"]["marginal_brotli_bytes"] < by_name["c"]["alone_brotli_bytes"]  # shares its text with "a"
    assert all(r["raw_bytes"] == len(sources[r["module"]]) for r in rows)


def test_record_parts_name_the_top_level_definitions_without_docstrings(tmp_path, capsys):
    tool = _tool()
    script = tmp_path / "train_gpt.py"
    script.write_text('"""module doc"""\nimport os\nX = 1\n\ndef f():\n    """doc of f"""\n    return X\n\n'
                      'class C:\n    """doc of C"""\n    def m(self):\n        """doc of m"""\n        pass\n')
    parts = tool.record_parts(script)
    assert list(parts) == ["import@0", "assign@1", "f", "C"]  # the module docstring is gone before numbering
    assert "doc" not in "".join(parts.values()) and parts["f"] == "def f():\n    return X"
    assert tool.main(["--record-script", str(script)]) == 0
    out = capsys.readouterr().out
    assert "4 top-level parts" in out and out.count(" marginal ") == 4
