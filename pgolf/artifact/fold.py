"""Recipe switches folded into the shipped form of a bundle (:mod:`pgolf.artifact.shrink`, step 4).

A bundle runs one recipe, so a test on that recipe's values has one outcome: ``if``/``elif``/conditional
expressions that depend only on it are decided at bundle time, and what they leave unreachable goes. A value is
known when it is read from a parameter annotated with a config section class (never rebound in its function), or
from a local bound once from such a read (``mode = cfg.ttt.mode``); ``and``/``or`` are simplified only past
operands without effects. tests/test_reproduce.py runs a folded bundle against the staged pipeline.

Whole modules go too: :func:`left_out_modules` names those the recipe can never run, and those behind a kernel
switch that is off in its module's source (:func:`module_switch`).
"""

from __future__ import annotations

import ast
from pathlib import Path

from pgolf.artifact.reach import walk as _walk
from pgolf.config import RunConfig


# Parameters annotated with one of these classes hold the recipe's own section in every bundled call (checked by
# tests/test_shrink.py: no bundled module builds or replaces one of them). PackConfig is not here: the pack stage
# builds a plain-brotli PackConfig for its comparison figure.
SECTIONS = {
    "RunConfig": (), "DataConfig": ("data",), "TokenizerConfig": ("tokenizer",), "ModelConfig": ("model",),
    "OptimConfig": ("optim",), "TrainConfig": ("train",), "HessianConfig": ("hessians",),
    "QuantizeConfig": ("quantize",), "EvaluateConfig": ("evaluate",), "TTTConfig": ("evaluate", "ttt"),
}
_UNKNOWN = object()


class _Known:
    """A local bound once to a recipe value: its value, not a section to read fields from."""

    def __init__(self, value):
        self.value = value
_COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
            ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b, ast.Is: lambda a, b: a is b,
            ast.IsNot: lambda a, b: a is not b}


def module_switch(path, name: str) -> bool:
    """The literal True / False of a module-level ``name = ...`` in the pgolf source file ``path``, read from the
    text: the bundler imports no torch, and the kernels' switches live in modules that do."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, bool):
                return value
    raise ValueError(f"{path}: expected a module-level {name} = True or False")


def _switch_value(value):
    """A recipe value a test may be decided on: bools, strings, None, numbers, tuples of those."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return value
    return _UNKNOWN


def _effect_free(node: ast.AST) -> bool:
    return not any(isinstance(n, (ast.Call, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)) for n in ast.walk(node))


class _Fold(ast.NodeTransformer):
    """Decide ``if``/``elif``/conditional-expression tests that depend only on the recipe: a parameter annotated
    with a section class (and never rebound in its function), its fields and constants."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.known: list[dict[str, object]] = [{}]
        self.folded = 0

    # ---- which names hold a section
    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        stores: dict[str, int] = {}
        for n in _walk(node):
            if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
                stores[n.id] = stores.get(n.id, 0) + 1
            elif isinstance(n, (ast.Global, ast.Nonlocal)):
                stores.update({name: 2 for name in n.names})
        known = dict(self.known[-1])
        args = node.args
        params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        for arg in params:
            if arg is None:
                continue
            known.pop(arg.arg, None)
            ann = arg.annotation
            name = ann.id if isinstance(ann, ast.Name) else ann.value if isinstance(ann, ast.Constant) else None
            if name in SECTIONS and arg.arg not in stores and arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                section = self.cfg
                for attr in SECTIONS[name]:
                    section = getattr(section, attr)
                known[arg.arg] = section
        for name in stores:  # a local shadows what the enclosing function knew
            known.pop(name, None)
        self.known.append(known)
        # a local assigned once, from a recipe value (`mode = cfg.ttt.mode`), is that value everywhere it is read
        param_names = {a.arg for a in params if a is not None}
        for stmt in _walk(node):
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                    and stores.get(stmt.targets[0].id) == 1 and stmt.targets[0].id not in param_names
                    and isinstance(stmt.value, ast.Attribute)):
                value = self._value(stmt.value)
                if value is not _UNKNOWN:
                    known[stmt.targets[0].id] = _Known(value)
        self.generic_visit(node)
        self.known.pop()
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        known = dict(self.known[-1])
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            known.pop(arg.arg, None)
        self.known.append(known)
        self.generic_visit(node)
        self.known.pop()
        return node

    # ---- static values
    def _value(self, node: ast.AST):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and isinstance(self.known[-1].get(node.id), _Known):
            return self.known[-1][node.id].value
        if isinstance(node, ast.Tuple):
            values = [self._value(e) for e in node.elts]
            return _UNKNOWN if any(v is _UNKNOWN for v in values) else tuple(values)
        if isinstance(node, ast.Attribute):
            chain = []
            while isinstance(node, ast.Attribute):
                chain.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id in self.known[-1] and not isinstance(self.known[-1][node.id], _Known):
                value = self.known[-1][node.id]
                for attr in reversed(chain):
                    if not hasattr(value, attr):
                        return _UNKNOWN
                    value = getattr(value, attr)
                return _switch_value(value)
            return _UNKNOWN
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            value = self._value(node.operand)
            return _UNKNOWN if value is _UNKNOWN else not value
        if isinstance(node, ast.Compare):
            left = self._value(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right = self._value(right_node)
                if left is _UNKNOWN or right is _UNKNOWN:
                    return _UNKNOWN
                try:
                    if not _COMPARE[type(op)](left, right):
                        return False
                except TypeError:
                    return _UNKNOWN
                left = right
            return True
        if isinstance(node, ast.BoolOp):
            values = [self._value(v) for v in node.values]
            if all(v is not _UNKNOWN for v in values):
                return all(values) if isinstance(node.op, ast.And) else any(values)
        return _UNKNOWN

    def _test(self, node: ast.expr) -> ast.expr:
        """The test, simplified where its known operands decide parts of an and/or (truth value only)."""
        value = self._value(node)
        if value is not _UNKNOWN:
            return ast.Constant(bool(value))
        if isinstance(node, ast.BoolOp):
            keep = []
            for operand in node.values:
                known = self._value(operand)
                if known is _UNKNOWN:
                    keep.append(self._test(operand))
                elif bool(known) == isinstance(node.op, ast.Or):  # `x or True`, `x and False`: decided ...
                    if all(_effect_free(k) for k in keep):  # ... when what it skips has no effect
                        return ast.Constant(bool(known))
                    keep.append(operand)
                    break
            if not keep:
                return ast.Constant(not isinstance(node.op, ast.Or))
            if len(keep) == 1:
                return keep[0]
            node.values = keep
        return node

    def visit_If(self, node: ast.If) -> ast.AST:
        self.generic_visit(node)
        node.test = self._test(node.test)
        if isinstance(node.test, ast.Constant):
            self.folded += 1
            return (node.body if node.test.value else node.orelse) or ast.Pass()
        return node

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        node.test = self._test(node.test)
        if isinstance(node.test, ast.Constant):
            self.folded += 1
            return node.body if node.test.value else node.orelse
        return node


_TERMINAL = (ast.Return, ast.Raise, ast.Continue, ast.Break)


def drop_unreachable(tree: ast.AST) -> None:
    """Statements after a ``return``/``raise``/``continue``/``break`` in the same block go (a folded ``if`` often
    leaves one: ``if <switch>: return a`` then ``return b``), unless they hold a ``yield`` or a scope declaration,
    which would change what the function is."""
    for node in _walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for i, stmt in enumerate(block):
                if isinstance(stmt, _TERMINAL):
                    rest = block[i + 1:]
                    if rest and not any(isinstance(n, (ast.Yield, ast.YieldFrom, ast.Global, ast.Nonlocal))
                                        for s in rest for n in ast.walk(s)):
                        del block[i + 1:]
                    break


def fold_switches(tree: ast.Module, cfg) -> int:
    """Decide, in place, the tests ``tree`` makes on ``cfg`` (the recipe); returns how many were decided."""
    folder = _Fold(cfg)
    folder.visit(tree)
    drop_unreachable(tree)
    ast.fix_missing_locations(tree)
    return folder.folded


def left_out_modules(cfg: RunConfig) -> dict[str, str]:
    """Modules the recipe (or a kernel switch off in its module) can never run, each with the setting that says so:
    left out of its bundle.

    Why: every embedded byte is counted against the 16,000,000-byte cap. Only modules that the record path
    imports lazily, inside the feature that needs them, can be left out; importing one from such a bundle fails
    with ModuleNotFoundError naming the module (the bundle report lists them with these reasons).
    """
    out: dict[str, str] = {}
    accounting = cfg.evaluate.byte_accounting
    if accounting == "sidecar" or (accounting == "auto" and cfg.tokenizer.caseops):
        reason = (f"evaluate.byte_accounting is {accounting!r} with tokenizer.caseops {cfg.tokenizer.caseops}: bytes "
                  "come from the sidecar, never from the tokenizer's lookup table")
        out["pgolf.data.tokenizer"] = reason
        out["pgolf.data.caseops"] = reason
    if cfg.evaluate.ttt.bigram_hash_buckets == 0:
        out["pgolf.evaluate.bigram_hash"] = "evaluate.ttt.bigram_hash_buckets is 0"
    if cfg.model.attention_backend in ("fa3", "torch"):
        out["pgolf.model.flash4"] = f"model.attention_backend is {cfg.model.attention_backend!r}: never FlashAttention 4"
    if not module_switch(Path(__file__).resolve().parents[1] / "model" / "attn_triton.py", "QKV_WARP_SPECIALIZED"):
        out["pgolf.model.gluon_qkv"] = ("pgolf.model.attn_triton.QKV_WARP_SPECIALIZED is False: never the Gluon "
                                        "q, k, v kernel")
    if not cfg.train.cuda_graphs:
        out["pgolf.train.graphs"] = "train.cuda_graphs is false"
    ttt = cfg.evaluate.ttt
    if ttt.mode == "lora" and ttt.variant == "record":
        out["pgolf.evaluate.lora"] = "evaluate.ttt.variant is record: the legacy variant's adapters are never built"
        if not ttt.cuda_graphs:
            out["pgolf.evaluate.ttt_graphs"] = "evaluate.ttt.cuda_graphs is false"
    else:
        for name in RECORD_TTT_MODULES:
            out[name] = "evaluate.ttt is not the record variant of LoRA TTT"
    return out


# the record variant of LoRA TTT, imported only when it runs (pgolf.evaluate.ttt.run_ttt)
RECORD_TTT_MODULES = tuple(f"pgolf.evaluate.{m}" for m in ("ttt_record", "ttt_plan", "ttt_adapters", "ttt_forward",
                                                              "ttt_phase", "ttt_graphs"))
