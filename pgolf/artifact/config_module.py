"""The shipped form's ``pgolf.config``: one generated module whose dataclass defaults ARE the recipe.

pgolf's own config package (:mod:`pgolf.config`) is a strict loader: YAML line numbers, type checks with readable
errors, a JSON schema, one validator per section. A bundle runs one recipe that was validated when the bundle was
built, so its shipped form (:func:`pgolf.artifact.bundle.module_table` with ``minify``) embeds this module in
place of the package:

- the same section classes, by the same names, with the same fields in the same order (so ``to_dict`` of a
  section, hashed into checkpoints and artifacts, is byte for byte the staged pipeline's), each field's default
  being the recipe's value (the bundle's CONFIG_JSON then holds only ``run``);
- their methods and properties, copied from pgolf's sources, and ``RunConfig``'s record-mode refusals (its
  ``__post_init__``); the other validators go, as they do from the package (:func:`pgolf.artifact.shrink.drop_validators`);
- ``from_mapping`` (the evaluation reads the model section back from an artifact's header), ``to_dict``,
  ``parse_run_config``, ``check`` and ``ConfigError``, small: a key the class does not have is refused, a JSON
  number becomes a float where the field is a float, a JSON list a tuple where the field is a tuple, and nothing
  else is checked (pgolf wrote and hashed what is read).

:func:`pgolf.artifact.bundle.check_bundle` runs the generated module and checks that it gives back the recipe. Its
error tags (``config:<line>``, :mod:`pgolf.artifact.shrink`) count lines of the generated source, not of pgolf's;
the bundle report's ``messages`` holds their texts as for every other tag.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from typing import Any, Literal, Union

from pgolf.config import RunConfig

# Modules the generated one replaces in the shipped form.
REPLACED_MODULES = ("pgolf.config", "pgolf.config.strict", "pgolf.config.training", "pgolf.config.post_training")

_HELPERS = '''
import dataclasses
import json


class ConfigError(ValueError):
    def __init__(self, message, key=None):
        super().__init__(message)
        self.key = key


def check(condition, message, key=None):
    if not condition:
        raise ConfigError(message, key)


def to_dict(obj):
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _value(kind, value):
    if value is None:
        return None
    if kind is float:
        return float(value)
    if kind == "floats":
        return tuple(float(v) for v in value)
    if kind is tuple:
        return tuple(value)
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, value, "")
    return value


def from_mapping(cls, data, where):
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(kinds))
    check(not unknown, f"{where}: unknown keys {unknown}")
    return cls(**{key: _value(kinds[key], value) for key, value in data.items()})


def parse_run_config(data, source="config"):
    return from_mapping(RunConfig, data, source)
'''


def _kind(tp: Any) -> str:
    """The annotation a generated field carries: what ``_value`` converts by (float, tuple, "floats", a section
    class) or the plain type it passes through."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"config field type {tp!r}: one type besides None expected")
        return _kind(options[0])
    if origin is Literal:
        return type(typing.get_args(tp)[0]).__name__
    if origin is tuple:
        args = typing.get_args(tp)
        if any(a not in (bool, int, float, str, Ellipsis) for a in args):  # _value makes one level of tuple only
            raise TypeError(f"config field type {tp!r}: a tuple of plain values expected")
        return '"floats"' if args and args[0] is float else "tuple"
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    if tp in (bool, int, float, str):
        return tp.__name__
    raise TypeError(f"config field type {tp!r} has no generated form")


def _sections(cls: type, out: dict[str, type]) -> dict[str, type]:
    """Section classes under ``cls``, nested ones first (a class is defined before a class that names it)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            _sections(hints[field.name], out)
    out.setdefault(cls.__name__, cls)
    return out


def _methods(cls: type, keep_post_init: bool) -> list[str]:
    """The source of the class's functions (properties included, annotations out), without the validator unless
    asked. A ``__post_init__`` that does more than check (one that normalizes a value, say) cannot go: refused."""
    from pgolf.artifact.shrink import only_checks

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    out = []
    for node in tree.body[0].body:
        if isinstance(node, ast.FunctionDef) and node.name == "__post_init__" and not keep_post_init \
                and not only_checks(node.body):
            raise TypeError(f"{cls.__name__}.__post_init__ does more than check: the generated config would lose it")
        if isinstance(node, ast.FunctionDef) and (node.name != "__post_init__" or keep_post_init):
            node.returns = None  # annotations would be evaluated at definition: the generated module has no typing
            for arg in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs):
                arg.annotation = None
            out.append(textwrap.indent(ast.unparse(node), "    "))
    return out


def _literal(value: Any) -> str:
    """Python source that evaluates to ``value`` (``repr``, except for floats without a literal: inf, nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, tuple):
        return "(" + "".join(f"{_literal(v)}, " for v in value) + ")"
    return repr(value)


def _class_source(cls: type, values: Any) -> str:
    """``cls`` as a generated frozen dataclass whose defaults are the fields of ``values`` (an instance of it);
    a field without a default in pgolf (RunConfig's ``run``) stays without one."""
    hints = typing.get_type_hints(cls)
    lines = ["@dataclasses.dataclass(frozen=True)", f"class {cls.__name__}:"]
    for field in dataclasses.fields(cls):
        kind = _kind(hints[field.name])
        if dataclasses.is_dataclass(hints[field.name]):
            lines.append(f"    {field.name}: {kind} = dataclasses.field(default_factory={kind})")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            lines.append(f"    {field.name}: {kind}")  # required: CONFIG_JSON gives it
        else:
            lines.append(f"    {field.name}: {kind} = {_literal(getattr(values, field.name))}")
    lines += _methods(cls, keep_post_init=cls is RunConfig)
    return "\n".join(lines)


def _section_values(cfg: RunConfig) -> dict[str, Any]:
    """Class name -> the recipe's instance of that section (each section class occurs once in a recipe), and
    ``RunConfig`` -> the recipe."""
    out: dict[str, Any] = {}

    def walk(obj: Any) -> None:
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if dataclasses.is_dataclass(value):
                if type(value).__name__ in out:
                    raise TypeError(f"section class {type(value).__name__} occurs twice in the recipe")
                out[type(value).__name__] = value
                walk(value)

    walk(cfg)
    return {**out, "RunConfig": cfg}


def generated_config_source(cfg: RunConfig) -> str:
    """The source of the shipped ``pgolf.config`` for recipe ``cfg``."""
    values = _section_values(cfg)
    classes = [_class_source(cls, values[name]) for name, cls in _sections(RunConfig, {}).items()]
    return _HELPERS.lstrip() + "\n\n" + "\n\n\n".join(classes) + "\n"


def shipped_config_changes(cfg: RunConfig) -> dict[str, Any]:
    """What CONFIG_JSON holds beside the generated module: the one field without a default."""
    return {"run": cfg.run}
