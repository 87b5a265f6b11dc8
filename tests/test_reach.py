"""Tree shaking from the bundle's entry points (pgolf.artifact.reach): what only unreached code names goes, what
Python, torch or a foreign base class may call by name stays, and the shaken program computes the same."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from pgolf.artifact.reach import shake_unreached, walk

MODULE = '''
import torch
import yaml

def helper_of_dead():
    return "dead"

def dead_cycle_a():
    return dead_cycle_b()

def dead_cycle_b():
    return dead_cycle_a()

def used_helper(x):
    return x + 1

def registered(fn):
    REGISTRY.append(fn.__name__)
    return fn

REGISTRY = []

@registered
def by_registration():
    return 0

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):          # nn.Module calls it by name
        return self.lin(x) * self.scale()

    def scale(self):
        return used_helper(1)

    def never_called(self):        # only this names helper_of_dead
        return helper_of_dead()

class Tee:
    def __init__(self):
        self.parts = []

    def write(self, text):         # print() calls it by name
        self.parts.append(text)

    def flush(self):
        pass

class Loader(yaml.SafeLoader):     # yaml calls its methods by names pgolf never spells
    def construct_mapping(self, node, deep=False):
        return {"seen": True, **super().construct_mapping(node, deep=deep)}

class Dynamic:
    def pick(self, name):
        return getattr(self, name)()

    def by_computed_name(self):
        return 7

def main():
    net = Net()
    out = net(torch.ones(1, 2)).shape
    tee = Tee()
    print("x", file=tee)
    loaded = yaml.load("a: 1", Loader=Loader)
    return [tuple(out), tee.parts, loaded, Dynamic().pick("by" + "_computed_name"), REGISTRY]
'''


def _run(source: str):
    namespace: dict = {}
    exec(compile(source, "<test>", "exec"), namespace)
    return namespace["main"]()


def test_shaking_from_the_entry_keeps_what_runs_and_drops_what_only_dead_code_names() -> None:
    source = textwrap.dedent(MODULE)
    trees = {"pgolf.m": ast.parse(source)}
    assert shake_unreached(trees, keep=("main",))
    while shake_unreached(trees, keep=("main",)):
        pass
    shaken = ast.unparse(trees["pgolf.m"])
    for gone in ("def never_called", "def helper_of_dead", "def dead_cycle_a", "def dead_cycle_b"):
        assert gone not in shaken
    for kept in ("def forward", "def scale", "def used_helper", "def write", "def flush", "def construct_mapping",
                 "def by_computed_name", "def by_registration", "def main"):
        assert kept in shaken
    assert _run(shaken) == _run(source) == [(1, 2), ["x", "\n"], {"seen": True, "a": 1}, 7, ["by_registration"]]


def test_a_method_any_module_names_stays() -> None:
    trees = {
        "pgolf.a": ast.parse("class A:\n    def used_elsewhere(self):\n        return 1\n    def unused(self):\n"
                             "        return 2\ndef main():\n    return A()\n"),
        "pgolf.b": ast.parse("from pgolf.a import main\nVALUE = main().used_elsewhere()\n"),
    }
    assert shake_unreached(trees, keep=("main",))
    a = ast.unparse(trees["pgolf.a"])
    assert "used_elsewhere" in a and "def unused" not in a


def test_type_aliases_and_compiled_patterns_are_values_shaking_may_drop_but_other_calls_stay() -> None:
    from pgolf.artifact.reach import defined_names

    def names(line: str) -> list[str]:
        return defined_names(ast.parse(line).body[0])

    assert names("Alias = Sequence[tuple[str, int]]") == ["Alias"]
    assert names("Kind = Literal['a', 'b']") == ["Kind"]
    assert names("PATTERN = re.compile('^[a-z]+$')") == ["PATTERN"]
    # a call may do anything: its statement stays whether or not the name is used
    assert names("ERRORS = collect_errors()") == []
    assert names("PATTERN = re.compile(make_pattern())") == []
    assert names("PATTERN = re.compile('x', flags=re.I)") == []
    assert names("VALUE = registry[register()]") == []


def test_walk_visits_what_ast_walk_visits_in_its_order() -> None:
    """Shaking's results depend on visiting order in places (which function's imports go first): the fast walk
    must be ast.walk's order, node for node, on real modules."""
    import pgolf.artifact.shrink
    import pgolf.model.gpt

    for module in (pgolf.artifact.shrink, pgolf.model.gpt):
        tree = ast.parse(Path(module.__file__).read_text())
        expected = list(ast.walk(tree))
        got = walk(tree)
        assert len(got) == len(expected) > 1000
        assert all(a is b for a, b in zip(got, expected))
