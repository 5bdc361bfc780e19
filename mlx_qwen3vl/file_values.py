"""Values read from a model directory's JSON files, checked against the dataclass they fill, before any
arithmetic uses them: a string where a number belongs, a negative size or a list where an object belongs
would otherwise end deep in model building as a TypeError, or as a confusing message about tensors.

The checks come from the dataclass itself: each field's type annotation (int, float, bool, str, lists of
them, None where the annotation allows it) and its range, by default a positive size (whole numbers
>= 1, numbers > 0); a field whose values may be zero or anything says so in its metadata (`RANGE`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any

from .errors import Qwen3VLError

RANGE = "range"  # a field's metadata key: the words of its rule, a key of _RULES
NON_NEGATIVE = {RANGE: ">= 0"}  # counts and indexes: token ids, layer numbers
ANY_NUMBER = {RANGE: "any"}  # signed or zero settings

_RULES = {
    ">= 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    "any": lambda v: True,
}


def checked_fields(cls, params: dict[str, Any], file: str, section: str = "") -> dict[str, Any]:
    """`params` with the value of each of `cls`'s fields it holds checked (floats given as whole numbers
    become floats); other keys are left as they are. Errors name `file` and the field, as
    `config.json: text_config.hidden_size`."""
    hints = typing.get_type_hints(cls)
    out = dict(params)
    for f in dataclasses.fields(cls):
        if f.init and f.name in params:
            where = f"{section}.{f.name}" if section else f.name
            out[f.name] = check_value(params[f.name], hints[f.name], file, where, f.metadata.get(RANGE))
    return out


def check_value(value, annotation, file: str, where: str, requirement: str | None = None):
    """`value` as `annotation` describes it, or a Qwen3VLError naming the file, the field and the rule."""
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in options:
            return None
        (annotation,) = [a for a in options if a is not type(None)]
    if dataclasses.is_dataclass(annotation):  # a nested section, built and checked by its own class
        if not isinstance(value, annotation):
            raise Qwen3VLError(f"{file}: {where} is {value!r:.40}, must be an object")
        return value
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list) or not all(_fits(v, item, requirement) for v in value):
            rule = _rule(item, requirement)
            raise Qwen3VLError(f"{file}: {where} is {value!r:.60}, must be a list of {_plural(rule)}")
        return [item(v) for v in value]
    if not _fits(value, annotation, requirement):
        raise Qwen3VLError(f"{file}: {where} is {value!r:.40}, must be {_rule(annotation, requirement)}")
    return annotation(value)


def _fits(value, kind: type, requirement: str | None) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    if kind is int and not isinstance(value, numbers.Integral):
        return False
    return _RULES[requirement or _default(kind)](value)


def _default(kind: type) -> str:
    return ">= 1" if kind is int else "> 0"


def _rule(kind: type, requirement: str | None) -> str:
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a string"
    noun = "a whole number" if kind is int else "a number"
    requirement = requirement or _default(kind)
    return noun if requirement == "any" else f"{noun} {requirement}"


def _plural(rule: str) -> str:
    return (
        rule.replace("a whole number", "whole numbers")
        .replace("a number", "numbers")
        .replace("a string", "strings")
    )
