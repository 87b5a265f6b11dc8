"""The shipped form of the bundle's modules (pgolf.artifact.shrink, pgolf.artifact.minify.shrink_source): each
transform keeps behaviour. (tests/test_reproduce.py runs a whole shrunk bundle against the staged pipeline.)"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from pgolf.artifact.minify import compact_source, rename_locals, shrink_source
from pgolf.artifact.shrink import needs_annotations, shake, tag_messages

REPO = Path(__file__).resolve().parents[1]

PROGRAM = '''
import math
from typing import Optional

LIMIT: int = 3
_seen: Optional[list] = None


def scale(values: list[float], factor: float = 2.0, *, shift: float = 0.0) -> list[float]:
    """A docstring."""
    total: float = 0.0
    out = []
    for index, value in enumerate(values):
        scaled = value * factor + shift
        total += scaled
        out.append(round(scaled, 3))
    squares = [value * value for value in out if value > 0]   # `value` also a loop variable above
    pairs = {key: [key * n for n in range(2)] for key in range(LIMIT)}
    if (count := len(out)) > 1:
        total /= count
    try:
        math.log(-1.0)
    except ValueError as error:
        message = str(error)
    return out, total, squares, pairs, message, index


def counter(start):
    count = start

    def bump(step=1):
        nonlocal count
        count += step
        return count

    twice = lambda step: bump(step) + bump(step)  # noqa: E731
    return bump, twice


def uses_global():
    global _seen
    _seen = [LIMIT]
    first = _seen[0]
    return [first for first in range(first)], first   # comprehension target shadows the local


class Box:
    size: int = 2

    def __init__(self, size: int):
        self.size = size

    def grow(self, by: int = 1) -> "Box":
        new = Box(self.size + by)
        return new

    @staticmethod
    def make(self=5):
        return Box(self)


def run():
    bump, twice = counter(10)
    return (scale([1.0, -2.0, 3.5], 3.0, shift=0.5), bump(), twice(2), uses_global(), Box(1).grow(by=2).size,
            Box.make(self=7).size, Box.__annotations__)
'''


def _run(source: str):
    namespace: dict = {}
    exec(compile(source, "<test>", "exec"), namespace)
    return namespace["run"]()


def test_shrunk_program_computes_the_same() -> None:
    shrunk = shrink_source(textwrap.dedent(PROGRAM))
    assert _run(shrunk) == _run(PROGRAM)
    assert "total" not in shrunk and "scaled" not in shrunk and "self" not in shrunk.split("def make")[0]
    assert "def scale(values,factor=2.0,*,shift=0.0):" in shrunk  # parameters keep their names (keyword calls)
    assert "size: int = 2" in ast.unparse(ast.parse(shrunk))  # class attributes keep their annotations
    assert "LIMIT=3" in shrunk and "Optional" not in shrunk.split("from typing")[1].split("\n", 1)[1]


def test_renaming_leaves_names_that_resolve_outside_alone() -> None:
    source = textwrap.dedent('''
        def f(x):
            y = x + 1
            return [y for y in range(y)] + [len(z) for z in [[y]]], math_const
        ''')
    tree = rename_locals(ast.parse(source))
    text = ast.unparse(tree)
    assert "math_const" in text and "len(" in text and "def f(x):" in text
    namespace = {"math_const": 7}
    exec(text, namespace)
    assert namespace["f"](2) == ([0, 1, 2, 1], 7)


def test_functions_with_dynamic_name_lookup_are_not_renamed() -> None:
    source = "def f(a):\n    value = a * 2\n    return locals()['value']\n"
    assert "value" in ast.unparse(rename_locals(ast.parse(source)))


@pytest.mark.parametrize("source", [
    "x = 1 .real\ny = x if x else-1\nz = 'a'if y else r'b'\nw = f'{x!r:>4}' 'tail'\n",
    "a = [i for i in range(3) if i not in(1,)]\nb = a[::-1]\nc = not a\nd = -a[0]**-2 if a else ~1\n",
    "def g(*args, **kwargs):\n    return lambda: (yield_ := 2)\nclass C(dict, metaclass=type):\n    pass\n",
    "s = '''line one\nline two'''\nif s:\n    t = (1,\n         2)\n",
])
def test_compaction_keeps_the_tree(source: str) -> None:
    compact = compact_source(source)
    assert ast.dump(ast.parse(compact)) == ast.dump(ast.parse(source))
    assert len(compact) <= len(source)


def test_error_messages_become_tags() -> None:
    tree = ast.parse(textwrap.dedent('''
        from pgolf.config.strict import check

        def f(n):
            check(n > 0, f"n: expected > 0, got {n}")
            if n > 5:
                raise ValueError(f"n: {n} is over {5 + 0}")
            if n == 4:
                raise FileNotFoundError(f"{n}: not found")
            print(f"progress {n}")  # log text stays
            return n
        '''))
    messages = tag_messages(tree, "pgolf.x.y")
    text = ast.unparse(tree)
    assert messages == {"x.y:5": "f'n: expected > 0, got {n}'", "x.y:7": "f'n: {n} is over {5 + 0}'",
                        "x.y:9": "f'{n}: not found'"}
    assert "check(n > 0, 'x.y:5')" in text and "ValueError('x.y:7')" in text
    assert "FileNotFoundError('x.y:9')" in text and "progress" in text
    namespace: dict = {}
    with pytest.raises(ValueError) as info:
        exec(text.replace("from pgolf.config.strict import check", "def check(c, m):\n    assert c, m"), namespace)
        namespace["f"](6)
    assert info.value.args == ("x.y:7",)


def test_shaking_drops_what_no_module_names() -> None:
    trees = {
        "pgolf.a": ast.parse(textwrap.dedent('''
            import os
            import json
            from pgolf.b import used, unused_here
            CONSTANT = (1, 2)
            REGISTERED = register()
            def helper():
                return helper_of_helper()
            def helper_of_helper():
                return 1
            def entry():
                return used() + json.dumps(CONSTANT) + str(TABLE)
            def by_string():
                return 0
            TABLE = {"name": "by_string"}
            __all__ = ["helper"]   # steers `import *` only, which no module does: it keeps nothing
            if __name__ == "__main__":
                entry()
            ''')),
        "pgolf.b": ast.parse("def used():\n    return 1\ndef unused_here():\n    return 2\n"),
    }
    shake(trees, keep=("entry",))
    a = ast.unparse(trees["pgolf.a"])
    assert "def helper" not in a and "os" not in a and "unused_here" not in a and "__main__" not in a
    assert "__all__" not in a
    assert "REGISTERED = register()" in a  # a call may have effects: kept
    assert "def entry" in a and "CONSTANT" in a and "import json" in a and "def by_string" in a
    assert "def unused_here" not in ast.unparse(trees["pgolf.b"]) and "def used" in ast.unparse(trees["pgolf.b"])


def test_every_pgolf_module_shrinks_to_valid_python() -> None:
    """The shrinking works on every source file of the package (the bundle embeds a subset, per recipe)."""
    for path in sorted((REPO / "pgolf").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        compile(shrink_source(source), str(path), "exec")


def test_recipe_switches_fold_only_what_the_recipe_decides() -> None:
    from pgolf.artifact.fold import fold_switches
    from pgolf.config import load_run_config

    cfg = load_run_config(REPO / "config.yaml")  # ttt.mode lora, train.compile true, prequant_ttt_epochs 0
    tree = ast.parse(textwrap.dedent('''
        def f(eval_cfg: EvaluateConfig, train_cfg: TrainConfig, other, flag):
            mode = eval_cfg.ttt.mode
            if mode == "lora":
                a = 1
            elif mode == "chunked":
                a = 2
            b = 3 if train_cfg.prequant_ttt_epochs > 0 else 4
            if flag and train_cfg.compile:
                a += 1
            if other.compile:
                a += 2
            if log() or not train_cfg.compile:  # log() must still run
                a += 3
            return a, b

        def g(train_cfg: TrainConfig):
            train_cfg = replace(train_cfg)   # rebound: not the recipe's any more
            return 1 if train_cfg.compile else 2
        '''))
    assert fold_switches(tree, cfg) == 3
    text = ast.unparse(tree)
    assert "chunked" not in text and "a = 1" in text and "b = 4" in text and "if flag:" in text
    assert "if other.compile:" in text and "if log() or False:" not in text and "log()" in text
    assert "1 if train_cfg.compile else 2" in text


def test_the_resume_module_goes_with_the_switch_that_imports_it() -> None:
    """pgolf.train.loop imports pgolf.train.resume inside ``if every > 0`` (every = train_cfg.resume_every_steps):
    the record recipe (0) folds the import away, so its bundle leaves the module out; a sweep that saves keeps it."""
    import dataclasses

    from pgolf.artifact.fold import fold_switches
    from pgolf.config import load_run_config

    record = load_run_config(REPO / "config.yaml")
    assert record.train.resume_every_steps == 0
    sweep = dataclasses.replace(record, mode="sweep", train=dataclasses.replace(record.train, resume_every_steps=10))
    source = (REPO / "pgolf" / "train" / "loop.py").read_text(encoding="utf-8")
    imports = {}
    for name, cfg in (("record", record), ("sweep", sweep)):
        tree = ast.parse(source)
        fold_switches(tree, cfg)
        imports[name] = "from pgolf.train import resume" in ast.unparse(tree)
    assert imports == {"record": False, "sweep": True}


def test_no_bundled_module_builds_or_replaces_a_folded_section() -> None:
    """Folding assumes a parameter annotated with a section class holds the recipe's section: no bundled module
    outside pgolf.config may build one or dataclasses.replace one."""
    from pgolf.artifact.bundle import collect_modules
    from pgolf.artifact.fold import SECTIONS

    for module in collect_modules():
        if module.name.startswith("pgolf.config"):
            continue
        for node in ast.walk(ast.parse(module.source)):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                assert name not in SECTIONS, f"{module.name}: builds a {name}"
                if name == "replace" and module.name != "pgolf.artifact.pack":  # pack replaces a PackConfig only
                    target = ast.unparse(node.args[0]) if node.args else ""
                    assert "cfg" not in target and "config" not in target, f"{module.name}: replaces {target}"


def test_only_pure_validators_of_dataclasses_go() -> None:
    from pgolf.artifact.shrink import drop_validators

    tree = ast.parse(textwrap.dedent('''
        @dataclasses.dataclass(frozen=True)
        class A:
            n: int = 1
            def __post_init__(self):
                check(self.n > 0, "n")
                for name in ("n",):
                    value = getattr(self, name)
                    if value > 9:
                        check(False, "big")

        @dataclasses.dataclass
        class B:
            n: int = 1
            def __post_init__(self):
                object.__setattr__(self, "n", 2)   # does work: kept

        @dataclasses.dataclass(frozen=True)
        class RunConfig:
            mode: str = "record"
            def __post_init__(self):
                check(self.mode == "record", "the record-mode refusals stay")

        class C:
            def __post_init__(self):
                check(True, "not a dataclass: kept")
        '''))
    drop_validators(tree)
    text = ast.unparse(tree)
    assert text.count("__post_init__") == 3 and "big" not in text
    assert "__post_init__" not in text.split("class B")[0]


def test_names_private_to_a_module_are_shortened() -> None:
    from pgolf.artifact.shrink import shorten_module_names

    trees = {
        "pgolf.a": ast.parse(textwrap.dedent('''
            from pgolf.io import atomic_write_json
            from pgolf.config import to_dict as as_dict
            class ShapeError(ValueError):
                pass
            def helper_function(x):
                return as_dict(x)
            def shared(x):
                return helper_function(x)
            def by_attribute(x):
                return x
            def main():
                atomic_write_json("p", shared(1))
                return getattr(main, "by_attribute")
            ''')),
        "pgolf.b": ast.parse("from pgolf.a import shared\nresult = shared(2)\n"),
    }
    shorten_module_names(trees, keep=("main",))
    a = ast.unparse(trees["pgolf.a"])
    assert "helper_function" not in a and "atomic_write_json(" not in a and "as_dict" not in a
    assert "def shared" in a and "class ShapeError" in a and "def main" in a and "def by_attribute" in a
    assert "from pgolf.io import atomic_write_json as " in a and "from pgolf.config import to_dict as " in a


def test_unreachable_statements_go_but_not_a_generators_yield() -> None:
    from pgolf.artifact.fold import drop_unreachable

    tree = ast.parse(textwrap.dedent('''
        def f(x):
            if x:
                return 1
                x += 1
            return 2
            print("never")

        def g():
            return
            yield 1
        '''))
    drop_unreachable(tree)
    text = ast.unparse(tree)
    assert "x += 1" not in text and "never" not in text and "yield 1" in text


def _exec_modules(trees: dict[str, ast.Module], entry: str):
    """Import the modules of ``trees`` (a fake ``pgolf`` package) and call ``<entry>.run()``."""
    import importlib.abc
    import importlib.machinery
    import sys

    sources = {name: ast.unparse(tree) for name, tree in trees.items()}

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "fakepkg" or fullname in sources:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname == "fakepkg")
            return None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            if module.__name__ in sources:
                exec(compile(sources[module.__name__], module.__name__, "exec"), module.__dict__)

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module(entry).run()
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "fakepkg" or n.startswith("fakepkg.")]:
            del sys.modules[name]


SHARED = {
    "fakepkg.lib": '''
LIMIT = 3
NAMED = 10
def helper(x):
    return x + LIMIT
def by_attribute():
    return 1
def by_string():
    return 2
class Thing:
    def value(self):
        return helper(1)
def kept_entry():
    return 4
def aliased():
    return 5
''',
    "fakepkg.app": '''
import fakepkg.lib as lib
from fakepkg.lib import LIMIT, NAMED, helper, Thing, by_string, kept_entry, aliased as other
def run():
    def NAMED_local():
        return 0
    return [helper(LIMIT), Thing().value(), lib.by_attribute(), getattr(lib, "by_string")(), kept_entry(), other(),
            NAMED]
''',
}


def test_names_shared_between_modules_are_shortened_consistently() -> None:
    from pgolf.artifact.shrink import shorten_shared_names

    trees = {name: ast.parse(textwrap.dedent(src)) for name, src in SHARED.items()}
    expected = _exec_modules({name: ast.parse(textwrap.dedent(src)) for name, src in SHARED.items()}, "fakepkg.app")
    assert shorten_shared_names(trees, keep=("kept_entry",)) == 5  # LIMIT, NAMED, helper, Thing, aliased
    lib, app = ast.unparse(trees["fakepkg.lib"]), ast.unparse(trees["fakepkg.app"])
    for gone in ("LIMIT", "def helper", "class Thing", "def aliased", "NAMED ="):
        assert gone not in lib
    assert "NAMED_local" in app  # a different name that contains it: untouched
    assert "as other" in app and "other()" in app  # the importer's alias stays, only the imported name changes
    for kept in ("def by_attribute", "def by_string", "def kept_entry"):  # attribute, string, keep
        assert kept in lib
    assert _exec_modules(trees, "fakepkg.app") == expected == [6, 4, 1, 2, 4, 5, 10]


def test_annotations_are_kept_where_code_reads_them_not_where_prose_names_them() -> None:
    """A module that registers a custom op or defines a Triton kernel keeps annotations and names (torch and Triton
    read them); one whose docstrings or comments merely mention those is shrunk like any other."""
    prose = 'def f(x: int) -> int:\n    """Calls torch.library.custom_op kernels, tl.constexpr args."""\n    return x  # triton.jit\n'
    assert not needs_annotations(prose)
    registers = 'import torch\n@torch.library.custom_op("pgolf::f", mutates_args=())\ndef f(x: torch.Tensor) -> torch.Tensor:\n    return x\n'
    assert needs_annotations(registers)
    kernel = 'import triton\nimport triton.language as tl\n@triton.jit\ndef k(x, BLOCK: tl.constexpr):\n    pass\n'
    assert needs_annotations(kernel)
    for module in ("pgolf/model/kernels.py", "pgolf/model/flash4.py", "pgolf/model/triton_kernels.py"):
        assert needs_annotations((REPO / module).read_text()), module
    assert not needs_annotations((REPO / "pgolf/model/attention.py").read_text())
