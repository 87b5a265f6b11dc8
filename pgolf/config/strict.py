"""Strict conversion of plain mappings (YAML, JSON) into frozen config dataclasses, and their JSON schema.

An unknown key, a wrong type or an out-of-range value is a :class:`ConfigError` that names the offending key
(``config.yaml:12: data.val_docs: expected int, got str``); its ``key`` attribute holds the dotted key path, which
:func:`pgolf.config.load_recipe` maps to the YAML line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import types
import typing
from typing import Any, Literal, Mapping, Union


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``key``: the dotted path of the offending key (``evaluate.ttt.lora_rank``, ``seeds[2]``) when known.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


ALLOWED_KEYS_SHOWN = 16  # an unknown key's message lists at most this many allowed names


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# --------------------------------------------------------------------------------------------------------------
# Generic strict conversion from plain mappings to dataclasses
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}", where)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}", where)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}", where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}", where)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {len(value)} items", where)
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in a dataclass definition
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}", where)


def from_mapping(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the recipe'}: expected a mapping, got {type(data).__name__}", where or None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        raise ConfigError(unknown_key_message(where, unknown, sorted(fields)), _join(where, str(unknown[0])))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, _join(where, key))
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'the recipe'}: missing required key(s) {', '.join(missing)}", where or None)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # a check of __post_init__ names its field first ("val_docs: expected > 0"): the key is where + that field
        # (or the dotted key a whole-recipe check names, "data.val_docs: ...")
        message = str(exc)
        named = re.match(r"([A-Za-z_][\w.]*(?:\[\d+\])?)(?:/\w+)?: ", message)
        key = exc.key
        if key is None and named and named.group(1).split(".")[0].split("[")[0] in fields:
            key = _join(where, named.group(1))
            message = _join(where, message)  # "model.num_layers: expected 1..1024, got 0"
        elif where:
            message = f"{where}: {message}"
        raise ConfigError(message, key or where or None) from None


def unknown_key_message(where: str, unknown: list, allowed: list[str]) -> str:
    """``data.val_doc: unknown key (did you mean 'val_docs'?); allowed in data: a, b, ... (13 keys)``."""
    first = str(unknown[0])
    guess = difflib.get_close_matches(first, allowed, n=1, cutoff=0.75)
    shown = ", ".join(allowed[:ALLOWED_KEYS_SHOWN])
    if len(allowed) > ALLOWED_KEYS_SHOWN:
        shown += f", ... ({len(allowed)} keys; `pgolf config schema` lists them all)"
    others = f" (also unknown: {', '.join(map(str, unknown[1:]))})" if len(unknown) > 1 else ""
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return f"{_join(where, first)}: unknown key{hint}{others}; allowed in {where or 'the top level'}: {shown}"


def _bounded(kind: type, minimum: float, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


# argparse types for counts, sizes and caps: a negative or zero count is refused before any work starts
positive_int = _bounded(int, 1, "an integer >= 1")
nonneg_int = _bounded(int, 0, "an integer >= 0")
positive_float = _bounded(float, 1e-300, "a number > 0")
nonneg_float = _bounded(float, 0.0, "a number >= 0")


def to_dict(obj: Any) -> dict:
    """Plain-JSON view of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


# A name that becomes a folder and travels through shell commands unquoted (run, data.name, submission_name).
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch


def folder_name_error(key: str, value: str) -> str:
    return f"{key}: expected letters, digits, '_', '.', '-' (it names a folder), got {value!r}"


def check(condition: bool, message: str, key: str | None = None) -> None:
    """Raise ConfigError(message) unless ``condition``; ``key`` defaults to the field the message starts with."""
    if not condition:
        raise ConfigError(message, key)


# --------------------------------------------------------------------------------------------------------------
# JSON schema, generated from the dataclasses so the two can never drift apart
# --------------------------------------------------------------------------------------------------------------


def schema_for(tp: Any) -> dict:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [schema_for(a) for a in typing.get_args(tp)]}
    if tp is type(None):
        return {"type": "null"}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": schema_for(args[0])}
        return {"type": "array", "prefixItems": [schema_for(a) for a in args], "minItems": len(args), "maxItems": len(args)}
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props = {}
        required = []
        for f in dataclasses.fields(tp):
            props[f.name] = schema_for(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        out = {"type": "object", "additionalProperties": False, "properties": props}
        if required:
            out["required"] = required
        return out
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}}[tp]
