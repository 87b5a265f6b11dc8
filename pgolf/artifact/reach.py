"""What the shipped code can reach: tree shaking from the bundle's entry points (:mod:`pgolf.artifact.shrink`).

Names link code conservatively: a name spelled anywhere in reached code (a name, an attribute, an imported name
or an identifier-like string constant) reaches every module-level definition and every method of a reached class
that bears it, in any bundled module. What is reached at the start:

- every module-level statement that is not a definition shaking may drop (imports, code with effects, a
  function whose decorator registers it somewhere: ``torch.library.custom_op``, ``register_fake``, ...);
- the entry points (``keep``: the bundle's ``__main__`` calls ``record_run.bundle_main``) and dunder names;
- in a reached class: its decorators, bases and every statement of its body that is not a method (dataclass
  fields, nested classes), and the methods something outside pgolf may call by name: dunders, the protocol
  names of the classes pgolf code subclasses or stands in for (``torch.nn.Module.forward``,
  ``torch.autograd.Function.backward``, a file object's ``write``/``flush``, ...: :func:`protocol_names`),
  methods with a decorator that may register them, and every method of a class that has a base class defined
  neither in the bundle nor among those protocols (``yaml.SafeLoader`` calls ``construct_mapping``), looks its
  own attributes up by a computed name (``getattr(self, name)``) or defines ``__getattr__``.

Everything else is reached only through a name spelled in reached code: a method that no reached code names, and
a function that only unreached code names, go. Compared with counting every spelling in every module (what
:func:`pgolf.artifact.shrink.shake` does), this also drops what only dead methods of live classes, or cycles of
dead functions, keep alive.
"""

from __future__ import annotations

import ast
from typing import Iterable

# decorators that only wrap or describe (no registration anywhere): a function carrying only these is dropped
# like an undecorated one
PURE_DECORATORS = {"dataclass", "lru_cache", "cache", "cached_property", "property", "staticmethod", "classmethod",
                   "no_grad", "inference_mode", "enable_grad", "contextmanager", "jit", "compile", "wraps",
                   "setter", "getter", "deleter", "total_ordering", "unique", "disable"}


def pure_value(node: ast.AST) -> bool:
    """An expression without side effects worth keeping (constants, containers of them, names, lambdas)."""
    if isinstance(node, (ast.Constant, ast.Name, ast.Lambda)):
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(pure_value(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is None or pure_value(k) for k in node.keys) and all(pure_value(v) for v in node.values)
    if isinstance(node, ast.Attribute):
        return pure_value(node.value)
    if isinstance(node, ast.Subscript):  # a type alias such as Literal["a", "b"] or Sequence[tuple[str, int]]
        return pure_value(node.value) and pure_value(node.slice)
    if isinstance(node, ast.Call):  # re.compile(<constant>): a compiled pattern, nothing else happens
        return (ast.unparse(node.func) == "re.compile" and not node.keywords
                and all(isinstance(a, ast.Constant) for a in node.args))
    if isinstance(node, (ast.BinOp,)):
        return pure_value(node.left) and pure_value(node.right)
    if isinstance(node, ast.UnaryOp):
        return pure_value(node.operand)
    return False


def defined_names(stmt: ast.stmt) -> list[str]:
    """Names a module-level statement defines that shaking may drop it for (empty: never dropped)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
    value = getattr(stmt, "value", None)
    if targets and all(isinstance(t, ast.Name) for t in targets) and value is not None and pure_value(value):
        return [t.id for t in targets]
    return []


def walk(root: ast.AST) -> list[ast.AST]:
    """``list(ast.walk(root))``, in the same order (breadth first), in about half the time: shaking walks every
    bundled module a few times per round, and ``ast.walk``'s generators were most of a bundle build."""
    out = [root]
    append = out.append
    i = 0
    while i < len(out):
        node = out[i]
        i += 1
        for field in node._fields:
            value = getattr(node, field, None)
            if value.__class__ is list:
                for item in value:
                    if isinstance(item, ast.AST):
                        append(item)
            elif isinstance(value, ast.AST):
                append(value)
    return out


def reference_name(node: ast.AST) -> str | None:
    """The name ``node`` spells that could refer to a definition (see the module docstring), or None."""
    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
        return node.value
    if isinstance(node, ast.alias) and node.name != "*":
        return node.name.split(".")[-1]
    return None


def references(node: ast.AST, counts: dict[str, int]) -> None:
    """Add to ``counts`` every name ``node`` spells that could refer to a definition (see the module docstring)."""
    for sub in walk(node):
        name = reference_name(sub)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else ""


def registers(node: ast.AST) -> bool:
    """A definition with a decorator that may register it somewhere (anything not in :data:`PURE_DECORATORS`)."""
    return any(_decorator_name(d) not in PURE_DECORATORS for d in getattr(node, "decorator_list", []))


def protocol_names() -> set[str]:
    """Method names code outside pgolf may call on a pgolf object without pgolf spelling them: those of
    ``object``, the standard classes pgolf subclasses or imitates (exceptions, file objects, threads, AST
    visitors, context managers, containers) and torch's (``nn.Module``, ``autograd.Function``, optimizers)."""
    import contextlib
    import io
    import logging
    import threading

    names = {"forward", "backward", "setup_context", "jvp", "vjp", "vmap", "generate_vmap_rule"}
    bases = [object, BaseException, io.TextIOBase, io.BufferedIOBase, io.RawIOBase, threading.Thread,
             ast.NodeVisitor, ast.NodeTransformer, contextlib.AbstractContextManager, logging.Handler, dict, list]
    try:
        import torch

        bases += [torch.nn.Module, torch.autograd.Function, torch.optim.Optimizer]
    except ImportError:  # names torch's classes call would be unknown: keep every public method
        return {"*"}
    for base in bases:
        names.update(dir(base))
    return names


# the classes whose protocol :func:`protocol_names` covers, by the last part of their spelling (``nn.Module``)
PROTOCOL_BASES = {"object", "Module", "Function", "Optimizer", "NodeVisitor", "NodeTransformer", "Thread",
                  "TextIOBase", "BufferedIOBase", "RawIOBase", "AbstractContextManager", "Handler", "dict", "list"}


def _base_name(node: ast.expr) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _dynamic(cls: ast.ClassDef, known_bases: set[str]) -> bool:
    """A class whose methods code outside pgolf may call by names :func:`protocol_names` does not know (a base
    class from elsewhere, e.g. ``yaml.SafeLoader``), that reaches its own members by a computed name, or that
    answers any name (``__getattr__``)."""
    if any(_base_name(b) not in known_bases for b in cls.bases) or cls.keywords:
        return True
    for node in walk(cls):
        if isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__getattribute__", "__dir__"):
            return True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
                and not (isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str))):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("vars", "dir"):
            return True
    return False


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def shake_unreached(trees: dict[str, ast.Module], keep: Iterable[str] = ()) -> bool:
    """Drop, in place, the module-level definitions and methods that the bundle's code cannot reach from its
    entry points (the module docstring says how); True if anything went."""
    import builtins

    protocol = protocol_names()
    keep_all_methods = "*" in protocol
    known_bases = PROTOCOL_BASES | {n.name for tree in trees.values() for n in walk(tree) if isinstance(n, ast.ClassDef)}
    known_bases |= {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    live: set[str] = set(keep)
    reached: set[int] = set()
    pending: list[ast.AST] = []
    by_name: dict[str, list[ast.AST]] = {}  # name -> definitions (module level, methods) reached through it

    def reach(node: ast.AST) -> None:
        if id(node) in reached:
            return
        reached.add(id(node))
        if not isinstance(node, ast.ClassDef):
            pending.append(node)
            return
        pending.extend([*node.decorator_list, *node.bases, *node.keywords])
        dynamic = _dynamic(node, known_bases)
        for member in node.body:
            if not isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                pending.append(member)
            elif (dynamic or keep_all_methods or _dunder(member.name) or member.name in protocol
                  or registers(member) or member.name in live):
                reach(member)
            else:
                by_name.setdefault(member.name, []).append(member)

    for tree in trees.values():
        for stmt in tree.body:
            names = defined_names(stmt)
            if not names or registers(stmt) or any(_dunder(n) or n in live for n in names):
                reach(stmt)
            else:
                for name in names:
                    by_name.setdefault(name, []).append(stmt)
    while pending:
        counts: dict[str, int] = {}
        references(pending.pop(), counts)
        for name in counts:
            if name not in live:
                live.add(name)
                for node in by_name.pop(name, []):
                    reach(node)
    unreached = {id(node) for nodes in by_name.values() for node in nodes} - reached
    changed = False

    def prune(body: list) -> list:
        nonlocal changed
        kept = []
        for stmt in body:
            if id(stmt) in unreached:
                changed = True
                continue
            if isinstance(stmt, ast.ClassDef) and id(stmt) in reached:
                stmt.body = prune(stmt.body) or [ast.Pass()]
            kept.append(stmt)
        return kept

    for tree in trees.values():
        tree.body = prune(tree.body)
    return changed
