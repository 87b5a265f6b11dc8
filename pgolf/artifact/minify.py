"""Counted code bytes: a conservative stdlib minifier and the brotli+base85 self-extracting wrapper.

The top records count their code as the length of a wrapper that decompresses and ``exec``s their minified
script::

    import brotli as B,base64 as b
    exec(B.decompress(b.b85decode("...")))

:func:`make_wrapper` returns that text for real (so the counted bytes are bytes that run) and
:func:`count_code_bytes` names the convention it counts under (``"wrapper"`` or ``"file"``).

Code bytes are counted in ONE place: :func:`counted_code` over a file's bytes (:func:`counted_code_bytes` reads the
file). The bundle's report, the pack stage, the gate, the record run and the submission check all call it, and
each stores the counted file's sha256 beside the count, so two counts of different files cannot pass for one.
The count is a function of the file's bytes, the running Python's ``ast.unparse`` and the brotli version
(:func:`counter_versions`, recorded beside the bundle's counts).

The minifier keeps every name. It removes comments, docstrings and every other statement that is a bare
literal, and ``assert`` statements; it drops blank lines and indents with one space per level. That is what
``pyminify --no-rename-locals --remove-literal-statements --remove-asserts`` does, minus its riskier rewrites.
Consequences worth knowing: ``__doc__`` becomes ``None`` and failed asserts no longer raise.
"""

from __future__ import annotations

import ast
import base64
import io
import tokenize

CODE_BYTES_CONVENTIONS = ("file", "wrapper")  # what count_code_bytes counts under
# beside a shipped train_gpt.py in a records folder: its error tags (``<module>:<line>``) -> pgolf's message texts
TAG_MESSAGES_FILE = "train_gpt_messages.json"
WRAPPER_HEAD = 'import brotli as B,base64 as b\nexec(B.decompress(b.b85decode("'
WRAPPER_TAIL = '")))\n'


class _StripLiteralsAndAsserts(ast.NodeTransformer):
    """Drop bare-literal statements (docstrings included) and asserts; keep bodies non-empty with ``pass``."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                continue
            kept = [
                stmt for stmt in body
                if not isinstance(stmt, ast.Assert)
                and not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))
            ]
            if not kept and field != "orelse" and not isinstance(node, ast.Module):
                kept = [ast.Pass()]  # a block (or a `finally:`) cannot be empty
            setattr(node, field, kept)
        return node


def _one_space_indent(source: str) -> str:
    """Re-indent with one space per block level and drop blank lines, leaving multi-line strings untouched."""
    lines = source.splitlines(keepends=True)
    depth = 0
    logical_starts: dict[int, int] = {}  # physical line number (1-based) -> block depth
    in_string_lines: set[int] = set()
    at_line_start = True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
            continue
        if tok.type == tokenize.DEDENT:
            depth -= 1
            continue
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            at_line_start = tok.type == tokenize.NEWLINE or at_line_start
            continue
        if tok.type in (tokenize.COMMENT, tokenize.ENDMARKER):
            continue
        if at_line_start:
            logical_starts[tok.start[0]] = depth
            at_line_start = False
        if tok.end[0] > tok.start[0]:  # a token spanning lines: a triple-quoted string
            in_string_lines.update(range(tok.start[0] + 1, tok.end[0] + 1))
    out = []
    for number, line in enumerate(lines, start=1):
        if number in in_string_lines:
            out.append(line)
        elif number in logical_starts:
            out.append(" " * logical_starts[number] + line.lstrip(" \t"))
        elif line.strip():
            out.append(line)  # continuation line of a bracketed expression
    return "".join(out)


def minify_source(source: str) -> str:
    """Minified Python source with the same behaviour (see the module docstring for what is removed)."""
    tree = ast.parse(source)
    tree = _StripLiteralsAndAsserts().visit(tree)
    ast.fix_missing_locations(tree)
    text = ast.unparse(tree)
    text = _one_space_indent(text + "\n")
    compile(text, "<minified>", "exec")  # a bug here must never ship silently
    return text


def make_wrapper(source: str, brotli_quality: int = 11) -> str:
    """The self-extracting wrapper around the minified, brotli-compressed, base85-encoded source."""
    import brotli

    packed = brotli.compress(minify_source(source).encode("utf-8"), quality=brotli_quality)
    return WRAPPER_HEAD + base64.b85encode(packed).decode("ascii") + WRAPPER_TAIL


def counter_versions() -> dict[str, str]:
    """What the ``wrapper`` count depends on besides the file: Python (``ast.unparse``) and brotli."""
    import platform

    try:
        import brotli

        brotli_version = str(getattr(brotli, "__version__", "unknown"))
    except ImportError:
        brotli_version = "absent"
    return {"python": platform.python_version(), "brotli": brotli_version}


def counted_code(data: bytes, convention: str, where: str = "code file") -> tuple[int, int, str]:
    """``(counted bytes, raw file bytes, sha256 of the bytes)`` of a code file's bytes under ``convention``: the
    one function that counts code (see the module docstring)."""
    import hashlib

    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: code file is not UTF-8 ({exc})") from None
    try:
        counted = count_code_bytes(source, convention)
    except SyntaxError as exc:
        raise ValueError(f"{where}: not valid Python, cannot minify it for the '{convention}' convention: {exc}") from None
    return counted, len(data), hashlib.sha256(data).hexdigest()


def counted_code_bytes(code_path, convention: str) -> tuple[int, int, str]:
    """:func:`counted_code` of the file at ``code_path``."""
    from pathlib import Path

    code_path = Path(code_path)
    try:
        data = code_path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{code_path}: code file not found") from None
    return counted_code(data, convention, str(code_path))


def count_code_bytes(source: str, convention: str) -> int:
    """Counted code bytes of ``source`` under ``convention``.

    - ``"file"``: UTF-8 length of the file as shipped;
    - ``"wrapper"``: UTF-8 length of :func:`make_wrapper` (brotli quality 11).
    """
    if convention == "file":
        return len(source.encode("utf-8"))
    if convention == "wrapper":
        return len(make_wrapper(source).encode("utf-8"))
    raise ValueError(f"code_bytes_convention: expected 'wrapper' or 'file', got {convention!r}")


# --------------------------------------------------------------------------------------------------------------
# Shrinking the modules a bundle embeds (bundle time only; the count above never renames)
# --------------------------------------------------------------------------------------------------------------
#
# The counting minifier cannot see inside the bundle's embedded module strings, so the bundle embeds them already
# minified, and may go further than the counting convention: annotations of functions and variables removed (class
# attributes keep theirs: dataclass fields are typed), local variables renamed to short names, spaces dropped
# between tokens. Parameter names stay (keyword calls), except a method's ``self``/``cls``; names of modules,
# classes, functions and attributes stay. Every rewrite keeps behaviour; tests/test_reproduce.py checks that a
# shrunk bundle computes the staged pipeline's artifact and score bit for bit.

_NO_RENAME_CALLS = {"locals", "vars", "eval", "exec", "globals", "dir"}  # they see local names as strings


def sees_names_as_strings(tree: ast.AST) -> bool:
    """Whether ``tree`` calls one of :data:`_NO_RENAME_CALLS`, so that renaming any of its names may break it."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _NO_RENAME_CALLS
               for n in ast.walk(tree))
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


class _StripAnnotations(ast.NodeTransformer):
    """Drop function annotations and the annotations of variables outside class bodies."""

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None:
                arg.annotation = None
        node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        for stmt in node.body:  # class-level annotations are kept; methods and nested code are still visited
            if not isinstance(stmt, ast.AnnAssign):
                self.visit(stmt)
        return node

    @staticmethod
    def _statement(stmt: ast.stmt):
        if not isinstance(stmt, ast.AnnAssign):
            return stmt
        if stmt.value is None:
            return None  # a bare declaration outside a class
        return ast.copy_location(ast.Assign(targets=[stmt.target], value=stmt.value), stmt)

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt) and not isinstance(node, ast.ClassDef):
                kept = [s for s in (self._statement(s) for s in body) if s is not None]
                setattr(node, field, kept or ([] if field == "orelse" else [ast.Pass()]))
        return super().generic_visit(node)


class _Scope:
    def __init__(self, parent: "_Scope | None"):
        self.parent, self.bound = parent, set()


class _FunctionNames:
    """Every occurrence of a name in one function (nested functions, lambdas and comprehensions included), with
    the scope it belongs to, and the names that must keep their spelling."""

    def __init__(self, function: ast.AST):
        self.uses: list[tuple[ast.AST, str, _Scope]] = []  # (node, field holding the name, scope)
        self.fixed: set[str] = set()  # parameters, globals, nonlocals, imports
        self.spelled: set[str] = set()  # every name spelled in the function
        self.ok = True
        top = _Scope(None)
        self.top = top
        self._arguments(function.args, top, own=True)
        for stmt in function.body:
            self._visit(stmt, top)

    def _name(self, node: ast.AST, field: str, scope: _Scope, binds: bool) -> None:
        name = getattr(node, field)
        self.spelled.add(name)
        if binds:
            scope.bound.add(name)
        self.uses.append((node, field, scope))

    def _arguments(self, args: ast.arguments, scope: _Scope, own: bool = False) -> None:
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None:
                self.spelled.add(arg.arg)
                scope.bound.add(arg.arg)
                if not own:
                    self.fixed.add(arg.arg)
                self.uses.append((arg, "arg", scope))

    def _function_scope(self, scope: _Scope) -> _Scope:
        while getattr(scope, "comprehension", False):
            scope = scope.parent
        return scope

    def _visit(self, node: ast.AST, scope: _Scope) -> None:
        if isinstance(node, (ast.ClassDef, ast.Match)) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                                                            and node.func.id in _NO_RENAME_CALLS):
            self.ok = False
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for expr in [*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None],
                         *getattr(node, "decorator_list", [])]:
                self._visit(expr, scope)
            if not isinstance(node, ast.Lambda):
                self._name(node, "name", scope, binds=True)
            inner = _Scope(scope)
            self._arguments(node.args, inner)
            for stmt in node.body if isinstance(node.body, list) else [node.body]:
                self._visit(stmt, inner)
            return
        if isinstance(node, _COMPREHENSIONS):
            inner = _Scope(scope)
            inner.comprehension = True
            for i, gen in enumerate(node.generators):
                self._visit(gen.iter, scope if i == 0 else inner)
                self._visit(gen.target, inner)
                for cond in gen.ifs:
                    self._visit(cond, inner)
            for part in ("elt", "key", "value"):
                if getattr(node, part, None) is not None:
                    self._visit(getattr(node, part), inner)
            return
        if isinstance(node, ast.NamedExpr):
            self._name(node.target, "id", self._function_scope(scope), binds=True)
            self._visit(node.value, scope)
            return
        if isinstance(node, ast.Name):
            self._name(node, "id", scope, binds=not isinstance(node.ctx, ast.Load))
            return
        if isinstance(node, ast.ExceptHandler) and node.name:
            self._name(node, "name", scope, binds=True)
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            self.fixed.update(node.names)
            self.spelled.update(node.names)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                self.fixed.add(bound)
                self.spelled.add(bound)
        for child in ast.iter_child_nodes(node):
            self._visit(child, scope)


def _short_names(taken: set[str]):
    import builtins
    import itertools
    import keyword
    import string

    first = string.ascii_letters
    reserved = taken | set(dir(builtins)) | set(keyword.kwlist) | set(keyword.softkwlist)
    for length in itertools.count(1):
        for head in first:
            for tail in itertools.product(first + string.digits + "_", repeat=length - 1):
                name = head + "".join(tail)
                if name not in reserved:
                    yield name


def _rename_function(function: ast.AST, is_method: bool) -> None:
    names = _FunctionNames(function)
    if not names.ok:
        return
    args = function.args
    own = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a is not None]
    renamable_self = (is_method and (args.posonlyargs or args.args) and own[0] in ("self", "cls")
                      and not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in function.decorator_list))
    fixed = names.fixed | set(own[1:] if renamable_self else own)

    def resolves_inside(name: str, scope: _Scope) -> bool:
        while scope is not None:
            if name in scope.bound:
                return True
            scope = scope.parent
        return False

    counts: dict[str, int] = {}
    outside: set[str] = set()
    for node, field, scope in names.uses:
        name = getattr(node, field)
        counts[name] = counts.get(name, 0) + 1
        if not resolves_inside(name, scope):
            outside.add(name)
    candidates = [n for n in counts if n not in fixed and n not in outside]
    candidates.sort(key=lambda n: (-counts[n], n))
    new_names = _short_names(names.spelled - set(candidates))
    mapping = {name: next(new_names) for name in candidates}
    for node, field, _ in names.uses:
        name = getattr(node, field)
        if name in mapping:
            setattr(node, field, mapping[name])


def rename_locals(tree: ast.Module) -> ast.Module:
    """Rename, in every function, the local variables whose every use resolves inside it (a uniform rename to a
    name spelled nowhere in the function cannot capture anything); parameters keep their names (keyword calls),
    except a method's ``self``/``cls``. Functions holding a class, a ``match`` or a call of locals/vars/eval/exec/
    globals/dir are left alone."""

    def walk(node: ast.AST, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                _rename_function(child, in_class)
            elif isinstance(child, ast.ClassDef):
                walk(child, True)
            elif not isinstance(child, ast.Lambda):
                walk(child, False)

    walk(tree, False)
    return tree


def _needs_space(before: tokenize.TokenInfo, after: tokenize.TokenInfo) -> bool:
    word = lambda ch: ch.isalnum() or ch == "_" or ord(ch) > 127  # noqa: E731
    a, b = before.string, after.string
    return (word(a[-1]) and (word(b[0]) or after.type == tokenize.STRING)) or (
        before.type == tokenize.NUMBER and b[0] == ".")


def compact_source(source: str) -> str:
    """The same program with one space per indentation level and no space between tokens that do not need one
    (``a=b+c``, ``f(x,y)``). A statement holding a token that spans lines keeps its text (re-indented). The
    caller checks the result parses to the same tree (:func:`shrink_source`)."""
    lines = source.splitlines(keepends=True)
    out: list[str] = []
    depth = 0
    current: list[tokenize.TokenInfo] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE:
            if current and any(t.start[0] != current[0].start[0] or t.end[0] != t.start[0] for t in current):
                first, last = current[0].start[0], tok.end[0]
                out.append(" " * depth + lines[first - 1].lstrip(" \t"))
                out.extend(lines[first:last])
            elif current:
                text = [current[0].string]
                for prev, nxt in zip(current, current[1:]):
                    text.append((" " if _needs_space(prev, nxt) else "") + nxt.string)
                out.append(" " * depth + "".join(text) + "\n")
            current = []
        elif tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.ENDMARKER):
            current.append(tok)
    return "".join(out)


def shrink_source(source: str, keep_annotations: bool = False) -> str:
    """:func:`minify_source`, then annotations removed (unless ``keep_annotations``: torch.library.custom_op
    reads them, Triton's ``tl.constexpr`` too), locals renamed (:func:`rename_locals`) and spaces compacted
    (:func:`compact_source`). The result is compiled before it is returned."""
    tree = _StripLiteralsAndAsserts().visit(ast.parse(source))
    if not keep_annotations:
        tree = _StripAnnotations().visit(tree)
    if not keep_annotations:  # (a module that needs its annotations may need its names too: left as written)
        tree = rename_locals(tree)
    ast.fix_missing_locations(tree)
    text = ast.unparse(tree) + "\n"
    compact = compact_source(text)
    if ast.dump(ast.parse(compact)) != ast.dump(ast.parse(text)):  # e.g. a tokenizer that splits f-strings
        compact = _one_space_indent(text)
    compile(compact, "<shrunk>", "exec")  # a bug here must never ship silently
    return compact
