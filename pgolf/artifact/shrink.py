"""The shipped form of a bundle's modules: fewer counted bytes, the same computation.

Every byte the bundle embeds is counted against the 16,000,000-byte cap, and the counting minifier cannot see
inside the embedded module strings, so the bundle embeds its modules already shrunk. Bundle-time transforms, in
this order, over the module table of :mod:`pgolf.artifact.bundle`, in which the generated ``pgolf.config`` of
:mod:`pgolf.artifact.config_module` (the recipe as dataclass defaults) stands in for the config package:

1. **Error messages become tags.** ``raise E(<string or f-string>)`` becomes ``raise E('<module>:<line>')`` (the
   f-string's values go too: they only describe the failure, and computing them cannot decide whether it
   raises), and ``check(<condition>, <text>)`` of the config validators ``check(<condition>, '<module>:<line>')``.
   The exception types stay, so every refusal still refuses; the text of each tag (``<module>:<line>`` of
   pgolf's own source) goes to the bundle's report (``train_gpt.py.json``, ``messages``). Progress and log lines
   keep their text: the run's log must stay readable.
2. **The recipe's switches are folded** (:mod:`pgolf.artifact.fold`): tests the recipe decides, and the code
   they leave unreachable, go.
3. **Validators go**: a config dataclass's ``__post_init__`` that can only raise (``check`` calls) is dropped
   (the embedded recipe was validated when the bundle was built); ``RunConfig`` keeps its record-mode refusals.
4. **Tree shaking.** ``if __name__ == "__main__":`` blocks go (an embedded module is imported, never run), and
   ``__all__`` lists when no bundled module star-imports. A module-level function, class or constant that no
   bundled module names anywhere (by name: a name, an attribute, an imported name or a string constant of any
   module counts, which is conservative), a private method of a dataclass nothing names, and a ``from pgolf...
   import`` name or standard-library import its module (or function) no longer uses and no other module takes
   from it, are dropped, to a fixpoint; then, alternating with that, what the entry point cannot reach
   (:func:`pgolf.artifact.reach.shake_unreached`: a method no reached code names, a definition only unreached
   code names). Then the modules nothing imports any more are dropped from the table.
5. **Names are shortened**: those one module imports from another and uses as plain names
   (:func:`shorten_shared_names`), then those private to one module (:func:`shorten_module_names`).
6. **Each module is minified** by :func:`pgolf.artifact.minify.shrink_source` (docstrings, comments, asserts and
   annotations out, locals renamed, spaces compacted); modules whose annotations or names matter at run time
   (``torch.library.custom_op`` schemas, Triton's ``tl.constexpr``) keep both.

What no transform does: rename a parameter (but a method's ``self``), an attribute, or a name another module
uses, or touch module-level code that may have effects. tests/test_reproduce.py runs a shrunk bundle against
the staged pipeline (pgolf's own sources) and asserts the same weights, artifact and score, bit for bit.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from typing import Iterable

from pgolf.artifact.fold import fold_switches
from pgolf.artifact.reach import defined_names as _defined, reference_name as _reference_name
from pgolf.artifact.reach import references as _references, shake_unreached, walk as _walk
from pgolf.artifact.minify import sees_names_as_strings, shrink_source

KEEP_ANNOTATIONS_MARKERS = ("custom_op", "torch.library", "triton.jit", "tl.constexpr")


@dataclasses.dataclass(frozen=True)
class ShrunkModule:
    name: str
    is_package: bool
    source: str


def _dotted(node: ast.AST) -> str:
    """``torch.library.custom_op`` for that attribute chain ('' where it does not end in a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def needs_annotations(module: str | ast.Module) -> bool:
    """A module (source or parsed) whose annotations are read at run time (custom op schemas, Triton constexpr
    arguments): its code spells one of the markers, in a name, an attribute chain or an import. Docstrings,
    comments and strings do not count: a module that only mentions custom ops in prose (the attention dispatcher,
    the counting minifier) is shrunk like any other."""
    tree = ast.parse(module) if isinstance(module, str) else module
    for node in _walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)):
            spelled = [_dotted(node)]
        elif isinstance(node, ast.ImportFrom):
            spelled = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            spelled = [alias.name for alias in node.names]
        else:
            continue
        if any(marker in name for name in spelled for marker in KEEP_ANNOTATIONS_MARKERS):
            return True
    return False


# --------------------------------------------------------------------------------------------------------------
# 1. Error messages -> tags
# --------------------------------------------------------------------------------------------------------------


def _is_text(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or isinstance(node, ast.JoinedStr)


class _TagMessages(ast.NodeTransformer):
    def __init__(self, module: str, has_check: bool):
        self.prefix = module.removeprefix("pgolf.") + ":"
        self.has_check = has_check
        self.messages: dict[str, str] = {}

    def _tag(self, text: ast.AST) -> ast.Constant:
        tag = f"{self.prefix}{text.lineno}"
        while tag in self.messages:  # two messages on one line
            tag += "'"
        self.messages[tag] = ast.unparse(text)
        return ast.Constant(tag)

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        call = node.exc
        if isinstance(call, ast.Call) and len(call.args) == 1 and not call.keywords and _is_text(call.args[0]):
            call.args = [self._tag(call.args[0])]
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if (self.has_check and isinstance(node.func, ast.Name) and node.func.id == "check" and len(node.args) == 2
                and not node.keywords and _is_text(node.args[1])):
            node.args[1] = self._tag(node.args[1])
        return self.generic_visit(node)


def tag_messages(tree: ast.Module, module: str) -> dict[str, str]:
    """Rewrite ``tree``'s error messages to tags (see the module docstring); returns ``{tag: message source}``."""
    has_check = any(
        (isinstance(n, ast.ImportFrom) and any(a.name == "check" for a in n.names))
        or (isinstance(n, ast.FunctionDef) and n.name == "check")
        for n in tree.body
    )
    tagger = _TagMessages(module, has_check)
    tagger.visit(tree)
    return tagger.messages


# --------------------------------------------------------------------------------------------------------------
# 2. Tree shaking
# --------------------------------------------------------------------------------------------------------------


def _bound_by_import(alias: ast.alias) -> str:
    return alias.asname or alias.name.split(".")[0]


def _is_stdlib(module: str) -> bool:
    top = module.split(".")[0]
    return top in sys.stdlib_module_names and top != "__future__"


def _prune_body(body: list, used) -> tuple[list, list]:
    """``body`` without the ``from pgolf...`` names and standard-library imports whose bound name is not in
    ``used``; returns the new body and the import statements that lost names (changed in place or dropped)."""
    kept_body, changed = [], []
    for stmt in body:
        prunable = (isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and stmt.module
                    and (stmt.module == "pgolf" or stmt.module.startswith("pgolf.") or _is_stdlib(stmt.module))) or (
            isinstance(stmt, ast.Import) and all(_is_stdlib(a.name) for a in stmt.names))
        if prunable:
            kept = [a for a in stmt.names if a.name == "*" or _bound_by_import(a) in used]
            if len(kept) != len(stmt.names):
                changed.append(stmt)
                if not kept:
                    continue
                stmt.names = kept
        kept_body.append(stmt)
    return kept_body or [ast.Pass()], changed


def _prune_function_imports(function: ast.AST) -> bool:
    """Drop the imports of ``function`` that its own statements no longer use; True if any went."""
    used: dict[str, int] = {}
    for stmt in function.body:
        if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
            _references(stmt, used)
    function.body, changed = _prune_body(function.body, used)
    return bool(changed)


@dataclasses.dataclass(frozen=True)
class _Facts:
    """What one round of shaking reads of a module-level statement, from one walk of it. Shaking keeps them until
    the statement changes (an import inside it loses names, a dataclass in it loses a method), so that a round
    walks only what the last round changed instead of every module."""

    stmt: ast.stmt  # held, so that the id the facts are filed under stays this statement's
    counts: dict[str, int]  # every name it spells that could refer to a definition (reach.references)
    attributes: frozenset[str]  # the attribute names it spells
    imports_from: tuple[ast.ImportFrom, ...]  # its ``from ... import`` statements, at any depth
    importing_functions: tuple[ast.AST, ...]  # functions in it, at any depth, with imports in their own body
    dataclasses: tuple[ast.ClassDef, ...]  # dataclass definitions in it, at any depth

    @classmethod
    def of(cls, stmt: ast.stmt) -> "_Facts":
        counts: dict[str, int] = {}
        attributes, imports_from, importing, classes = set(), [], [], []
        for node in _walk(stmt):  # breadth first: an enclosing function comes before the functions it holds
            name = _reference_name(node)
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
            if isinstance(node, ast.Attribute):
                attributes.add(node.attr)
            elif isinstance(node, ast.ImportFrom):
                imports_from.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(isinstance(s, (ast.Import, ast.ImportFrom)) for s in node.body):
                    importing.append(node)
            elif isinstance(node, ast.ClassDef) and _is_dataclass(node):
                classes.append(node)
        return cls(stmt, counts, frozenset(attributes), tuple(imports_from), tuple(importing), tuple(classes))


class _FactsCache:
    """:class:`_Facts` per module-level statement, computed on first use and dropped when the statement changes."""

    def __init__(self) -> None:
        self._by_id: dict[int, _Facts] = {}

    def __call__(self, stmt: ast.stmt) -> _Facts:
        facts = self._by_id.get(id(stmt))
        if facts is None:
            facts = self._by_id[id(stmt)] = _Facts.of(stmt)
        return facts

    def forget(self, stmt: ast.stmt) -> None:
        self._by_id.pop(id(stmt), None)


def _prune_imports(tree: ast.Module, exported: set[str], facts: _FactsCache) -> bool:
    """Drop ``from pgolf...`` names and standard-library imports that a module, or a function (its imports at the
    top of its body), no longer uses; True if any went. ``exported``: names other modules take from this one
    (re-exports stay)."""
    changed = False
    for stmt in tree.body:
        for function in facts(stmt).importing_functions:
            if _prune_function_imports(function):
                changed = True
                facts.forget(stmt)
    used = set(exported)
    for stmt in tree.body:
        if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
            used.update(facts(stmt).counts)
    tree.body, lost = _prune_body(tree.body, used)
    for stmt in lost:
        facts.forget(stmt)
    return changed or bool(lost)


def _exports(trees: dict[str, ast.Module], facts: _FactsCache) -> dict[str, set[str]]:
    """Per module, the names other modules may take from it: ``from <module> import <name>`` anywhere, and every
    attribute name spelled anywhere (``pgolf.config.to_dict``)."""
    statements = [stmt for tree in trees.values() for stmt in tree.body]
    attributes = set().union(*(facts(stmt).attributes for stmt in statements))
    out = {name: set(attributes) for name in trees}
    for stmt in statements:
        for node in facts(stmt).imports_from:
            if node.module in out and node.level == 0:
                out[node.module].update(a.name for a in node.names)
    return out


KEEP_VALIDATORS = {"RunConfig"}  # its checks are the record-mode refusals (50,000 documents, no pre-quant TTT)


def _is_dataclass(node: ast.ClassDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if (isinstance(target, ast.Name) and target.id == "dataclass") or (
                isinstance(target, ast.Attribute) and target.attr == "dataclass"):
            return True
    return False


def only_checks(stmts: list) -> bool:
    """Statements that can only raise: ``check(...)`` calls, and ifs, loops and local assignments around them."""
    for stmt in stmts:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Name) \
                and stmt.value.func.id == "check":
            continue
        if isinstance(stmt, ast.If) and only_checks(stmt.body) and only_checks(stmt.orelse):
            continue
        if isinstance(stmt, ast.For) and isinstance(stmt.target, (ast.Name, ast.Tuple)) and not stmt.orelse \
                and only_checks(stmt.body):
            continue
        if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            continue
        if isinstance(stmt, ast.Pass):
            continue
        return False
    return True


def drop_validators(tree: ast.Module) -> None:
    """Config dataclasses lose ``__post_init__`` methods that only validate (``check`` calls): the bundle's recipe
    was validated when the bundle was built, and every other section a record run builds is read back from its
    own checkpoint or artifact. Private methods of dataclasses that nothing names any more go with shaking."""
    for node in _walk(tree):
        if isinstance(node, ast.ClassDef) and _is_dataclass(node) and node.name not in KEEP_VALIDATORS:
            node.body = [s for s in node.body if not (isinstance(s, ast.FunctionDef) and s.name == "__post_init__"
                                                      and only_checks(s.body))] or [ast.Pass()]


def _is_all(stmt: ast.stmt) -> bool:
    """``__all__ = [...]``: it only steers ``from m import *``."""
    return isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets)


def _is_main_guard(stmt: ast.stmt) -> bool:
    test = stmt.test if isinstance(stmt, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__" and not stmt.orelse)


def shake(trees: dict[str, ast.Module], keep: Iterable[str] = ()) -> None:
    """Drop unreferenced module-level definitions and unused imports from ``trees`` in place, to a fixpoint."""
    keep = set(keep)

    def per_method(stmt: ast.stmt) -> dict[str, int]:
        counts: dict[str, int] = {}
        _references(stmt, counts)
        return counts

    star = any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)
               for tree in trees.values() for n in _walk(tree))
    for tree in trees.values():  # an embedded module is imported, never run as __main__; without a star import
        tree.body = [stmt for stmt in tree.body if not _is_main_guard(stmt) and (star or not _is_all(stmt))]
    facts = _FactsCache()
    while True:
        exports = _exports(trees, facts)
        changed = any([_prune_imports(tree, exports[name], facts) for name, tree in trees.items()])
        total: dict[str, int] = {}
        for tree in trees.values():
            for stmt in tree.body:
                for name, n in facts(stmt).counts.items():
                    total[name] = total.get(name, 0) + n
        for tree in trees.values():
            body = []
            for stmt in tree.body:
                own = facts(stmt)
                for cls in own.dataclasses:
                    kept = []
                    for member in cls.body:
                        name = member.name if isinstance(member, ast.FunctionDef) else ""
                        private = name.startswith("_") and not name.startswith("__")
                        if private and total.get(name, 0) - per_method(member).get(name, 0) == 0:
                            changed = True
                            facts.forget(stmt)
                            continue
                        kept.append(member)
                    cls.body = kept or [ast.Pass()]
                names = _defined(stmt)
                unused = names and all(
                    not (n.startswith("__") and n.endswith("__")) and n not in keep
                    and total.get(n, 0) - own.counts.get(n, 0) == 0 for n in names
                )
                if unused:
                    changed = True
                    facts.forget(stmt)
                    continue
                body.append(stmt)
            tree.body = body
        if not changed:
            return


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------


def shrink_modules(modules: list, entry: str, reachable, cfg=None) -> tuple[list[ShrunkModule], dict[str, str]]:
    """``modules``: ``[(name, is_package, source)]`` of a bundle. Returns the shrunk table (only the modules still
    reachable from ``entry``; ``reachable(sources)`` computes them from ``{name: (is_package, source)}``) and the
    message table ``{tag: message}``. With ``cfg`` (the recipe) its switches are folded first."""
    trees: dict[str, ast.Module] = {}
    messages: dict[str, str] = {}
    kinds: dict[str, bool] = {}
    keep_annotations: dict[str, bool] = {}
    for name, is_package, source in modules:
        tree = ast.parse(source, filename=name)
        keep_annotations[name] = needs_annotations(tree)  # before any transform
        messages.update(tag_messages(tree, name))
        if cfg is not None:
            fold_switches(tree, cfg)
        drop_validators(tree)
        trees[name], kinds[name] = tree, is_package
    keep = ("bundle_main",)  # the bundle's own __main__ calls record_run.bundle_main
    shake(trees, keep=keep)
    while shake_unreached(trees, keep=keep):  # what only unreached code names goes too, then its imports
        shake(trees, keep=keep)
    alive = set(reachable({name: (kinds[name], ast.unparse(tree) + "\n") for name, tree in trees.items()}))
    trees = {name: tree for name, tree in trees.items() if name in alive}
    shorten_shared_names(trees, frozen={name for name in trees if keep_annotations[name]}, keep=keep)
    shorten_module_names({name: tree for name, tree in trees.items() if not keep_annotations[name]}, keep=keep)
    out = [ShrunkModule(name, kinds[name], shrink_source(ast.unparse(trees[name]) + "\n", keep_annotations[name]))
           for name in sorted(trees)]
    used_tags = {tag for tag in messages if any(repr(tag) in m.source or f'"{tag}"' in m.source for m in out)}
    return out, {tag: text for tag, text in sorted(messages.items()) if tag in used_tags}


# --------------------------------------------------------------------------------------------------------------
# 4. Names private to one module shortened
# --------------------------------------------------------------------------------------------------------------


def _identifiers(tree: ast.AST) -> set[str]:
    """Every spelling in ``tree`` that could name something: names, attributes, parameters, keywords, imported
    names and their aliases, definitions, globals and identifier-like strings."""
    out: set[str] = set()
    for node in _walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            out.add(node.arg)
        elif isinstance(node, ast.alias):
            out.update(node.name.split("."))
            if node.asname:
                out.add(node.asname)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            out.update(node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            out.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            out.add(node.value)
    return out


def _module_bindings(tree: ast.Module) -> dict[str, list]:
    """Module-level names that can be renamed in place, with the nodes that spell their binding."""
    out: dict[str, list] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.setdefault(stmt.name, []).append(stmt)
        elif isinstance(stmt, ast.ClassDef):
            if not stmt.name.endswith(("Error", "Exception", "Failed", "Warning")):  # error types stay readable
                out.setdefault(stmt.name, []).append(stmt)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)) and not (isinstance(stmt, ast.ImportFrom)
                                                                     and stmt.module == "__future__"):
            for alias in stmt.names:
                if alias.name != "*" and (alias.asname or "." not in alias.name):
                    out.setdefault(alias.asname or alias.name, []).append(alias)
    return out


def shorten_module_names(trees: dict[str, ast.Module], keep: Iterable[str] = ()) -> None:
    """Rename, in each module, the module-level functions, classes and imported names that no other bundled
    module can reach (no spelling of the name anywhere else) and that the module itself never spells as an
    attribute, a parameter, a keyword, a string or a class member: a uniform rename to a name spelled nowhere in
    the module cannot change what any name refers to. Error classes keep their names (tracebacks)."""
    spellings = {name: _identifiers(tree) for name, tree in trees.items()}
    counts: dict[str, int] = {}
    for names in spellings.values():
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    for name, tree in trees.items():
        if sees_names_as_strings(tree):
            continue
        unsafe: set[str] = set()
        for node in _walk(tree):
            if isinstance(node, ast.Attribute):
                unsafe.add(node.attr)
            elif isinstance(node, ast.arg):
                unsafe.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                unsafe.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                unsafe.add(node.value)
            elif isinstance(node, ast.ClassDef):
                for member in node.body:
                    unsafe.update(_identifiers(member) if not isinstance(member, ast.FunctionDef) else {member.name})
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                unsafe.update(node.names)
        bindings = _module_bindings(tree)
        uses: dict[str, int] = {}
        for node in _walk(tree):
            if isinstance(node, ast.Name):
                uses[node.id] = uses.get(node.id, 0) + 1
        candidates = [n for n in bindings
                      if counts.get(n, 0) == 1 and n not in unsafe and n not in keep
                      and not (n.startswith("__") and n.endswith("__"))
                      and sum(1 for b in bindings[n] if not isinstance(b, ast.alias)) <= 1]
        from pgolf.artifact.minify import _short_names

        fresh = _short_names(spellings[name])
        mapping = {n: next(fresh) for n in sorted(candidates, key=lambda n: (-uses.get(n, 0), n))}
        if not mapping:
            continue
        for node in _walk(tree):
            if isinstance(node, ast.Name) and node.id in mapping:
                node.id = mapping[node.id]
        for n, new in mapping.items():
            for binding in bindings[n]:
                if isinstance(binding, ast.alias):
                    binding.asname = new
                else:
                    binding.name = new


# --------------------------------------------------------------------------------------------------------------
# 5b. Names shared between modules shortened
# --------------------------------------------------------------------------------------------------------------


def _spelling_kinds(tree: ast.AST) -> dict[str, set[str]]:
    """Every identifier ``tree`` spells, with how: ``load``/``store`` (a name read or bound), ``def`` (a function or
    class name; ``def@top`` at module level), ``from:<module>`` (the name of ``from <module> import name``),
    ``as`` (an import's alias), and ``other`` (an attribute, a parameter, a keyword, a string, a plain
    ``import``, ``global``/``nonlocal``, an exception name, a relative or star import)."""
    kinds: dict[str, set[str]] = {}

    def add(name: str, kind: str) -> None:
        kinds.setdefault(name, set()).add(kind)

    top = {id(s) for s in getattr(tree, "body", [])}
    for node in _walk(tree):
        if isinstance(node, ast.Name):
            add(node.id, "load" if isinstance(node.ctx, ast.Load) else "store")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            add(node.name, "def@top" if id(node) in top else "def")
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                add(alias.name, f"from:{node.module}" if node.level == 0 and alias.name != "*" else "other")
                if alias.asname:
                    add(alias.asname, "as")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                for part in [*alias.name.split("."), alias.asname or ""]:
                    if part:
                        add(part, "other")
        elif isinstance(node, ast.Attribute):
            add(node.attr, "other")
        elif isinstance(node, ast.arg):
            add(node.arg, "other")
        elif isinstance(node, ast.keyword) and node.arg:
            add(node.arg, "other")
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            for name in node.names:
                add(name, "other")
        elif isinstance(node, ast.ExceptHandler) and node.name:
            add(node.name, "other")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            add(node.value, "other")
    return kinds


def shorten_shared_names(trees: dict[str, ast.Module], frozen: Iterable[str] = (), keep: Iterable[str] = ()) -> int:
    """Rename the module-level functions, classes and constants that other bundled modules take by ``from <module>
    import <name>`` and use as plain names only; returns how many. A name qualifies when its module binds it once,
    at module level (a ``def``, a ``class`` or a one-name assignment), and spells it otherwise only as a read; every other module spells it only as that import's name
    and as reads (or only as the import's name, under an alias); no module spells it as anything else (an
    attribute, a parameter, a keyword, a string, a binding of its own); error classes and ``keep`` stay, and
    modules in ``frozen`` (annotations or names read at run time) are not touched: a name they spell stays. The
    new name is spelled nowhere in the modules involved, so the uniform rename cannot change what a name means."""
    keep, frozen = set(keep), set(frozen)
    if any(sees_names_as_strings(tree) for tree in trees.values()):
        return 0
    kinds = {name: _spelling_kinds(tree) for name, tree in trees.items()}
    # per module, from one walk (kept up to date by the renames below): its Name nodes by name, how many of them
    # bind, and its from-imports
    name_nodes: dict[str, dict[str, list[ast.Name]]] = {}
    bindings: dict[str, dict[str, int]] = {}
    imports_from: dict[str, list[ast.ImportFrom]] = {}
    for module, tree in trees.items():
        name_nodes[module], bindings[module], imports_from[module] = {}, {}, []
        for node in _walk(tree):
            if isinstance(node, ast.Name):
                name_nodes[module].setdefault(node.id, []).append(node)
                if not isinstance(node.ctx, ast.Load):
                    bindings[module][node.id] = bindings[module].get(node.id, 0) + 1
            elif isinstance(node, ast.ImportFrom):
                imports_from[module].append(node)
    renamed = 0
    for home, tree in trees.items():
        if home in frozen:
            continue
        for stmt in list(tree.body):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name, binding = stmt.name, "def@top"
                once = sum(1 for s in tree.body if getattr(s, "name", None) == name) == 1
            elif (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
                name, binding = stmt.targets[0].id, "store"  # a constant: bound once, by this statement
                once = bindings[home].get(name, 0) == 1
            else:
                continue
            if name in keep or name.startswith("__") or name.endswith(("Error", "Exception", "Failed", "Warning")):
                continue
            if not once or not kinds[home].get(name, set()) <= {"load", binding}:
                continue
            users, ok = [], True
            for other, spelled in kinds.items():
                how = spelled.get(name)
                if other == home or how is None:
                    continue
                if other in frozen or not how <= {"load", f"from:{home}"} or f"from:{home}" not in how:
                    ok = False
                    break
                aliased = any(n.module == home and any(a.name == name and a.asname for a in n.names)
                              for n in imports_from[other])
                if aliased and "load" in how:
                    ok = False
                    break
                users.append(other)
            if not ok or not users:
                continue
            taken = set().union(*(kinds[m] for m in [home, *users]))
            from pgolf.artifact.minify import _short_names

            new = next(_short_names(taken))
            for module in [home, *users]:
                for node in name_nodes[module].get(name, []):
                    node.id = new
                name_nodes[module][new] = name_nodes[module].pop(name, [])
                bindings[module][new] = bindings[module].pop(name, 0)
                for node in imports_from[module]:
                    if node.module == home:
                        for alias in node.names:
                            if alias.name == name:
                                alias.name = new
                kinds[module].setdefault(new, set()).update(kinds[module].pop(name, set()))
            if binding == "def@top":
                stmt.name = new
            renamed += 1
    return renamed
