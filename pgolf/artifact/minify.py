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
