"""Filter criteria: EventBridge-style patterns that decide which records reach the handler.

A pattern is a JSON object whose leaves are lists of matchers; a record matches when every key of the
pattern matches (AND), a list of matchers matches when any of them does (OR), and a record matches the
filter criteria when any pattern matches. Supported matchers (as in AWS Lambda's event filtering):

- exact values: ``"on"``, ``42``, ``true``, ``null``
- ``{"prefix": "T0"}``, ``{"suffix": ".csv"}``, ``{"equals-ignore-case": "ok"}``
- ``{"anything-but": ["a", "b"]}`` / ``{"anything-but": 3}`` / ``{"anything-but": {"prefix": "x"}}``
- ``{"numeric": [">", 0, "<=", 5]}`` (operators ``=``, ``<``, ``<=``, ``>``, ``>=``)
- ``{"exists": true}`` / ``{"exists": false}``

Records are matched as ``{"topic", "partition", "offset", "timestamp", "key", "headers", "value"}`` where
``value`` is the decoded JSON value (or the raw text when the value is not JSON), as Lambda does for Kafka.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Matcher = Callable[[Any, bool], bool]  # (value, present) -> matched
_MISSING = object()
_NUMERIC_OPS: dict[str, Callable[[float, float], bool]] = {
    "=": lambda a, b: a == b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


class FilterError(ValueError):
    """A filter pattern that cannot be used, with the path of the problem."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _compile_exact(expected: Any) -> Matcher:
    def match(value: Any, present: bool) -> bool:
        if not present:
            return False
        if _is_number(expected) and _is_number(value):
            return float(expected) == float(value)
        return type(value) is type(expected) and value == expected
    return match


def _compile_numeric(spec: Any, path: str) -> Matcher:
    if not isinstance(spec, list) or not spec or len(spec) % 2 or len(spec) > 4:
        raise FilterError(f"{path}: numeric needs [op, number] or [op, number, op, number]")
    checks: list[tuple[Callable[[float, float], bool], float]] = []
    for op, bound in zip(spec[::2], spec[1::2], strict=True):
        if op not in _NUMERIC_OPS or not _is_number(bound):
            raise FilterError(f"{path}: numeric operator {op!r} / bound {bound!r} not understood")
        checks.append((_NUMERIC_OPS[op], float(bound)))

    def match(value: Any, present: bool) -> bool:
        return present and _is_number(value) and all(check(float(value), b) for check, b in checks)
    return match


def _compile_matcher(spec: Any, path: str) -> Matcher:
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise FilterError(f"{path}: nested lists are not a matcher")
        return _compile_exact(spec)
    if len(spec) != 1:
        raise FilterError(f"{path}: a matcher object has exactly one key, got {sorted(spec)}")
    (kind, arg), = spec.items()
    if kind == "prefix" and isinstance(arg, str):
        return lambda v, present: present and isinstance(v, str) and v.startswith(arg)
    if kind == "suffix" and isinstance(arg, str):
        return lambda v, present: present and isinstance(v, str) and v.endswith(arg)
    if kind == "equals-ignore-case" and isinstance(arg, str):
        return lambda v, present: present and isinstance(v, str) and v.casefold() == arg.casefold()
    if kind == "exists" and isinstance(arg, bool):
        return lambda v, present: present == arg
    if kind == "numeric":
        return _compile_numeric(arg, path)
    if kind == "anything-but":
        if isinstance(arg, dict):
            inner = _compile_matcher(arg, f"{path}.anything-but")
            return lambda v, present: present and not inner(v, present)
        excluded = [_compile_exact(a) for a in (arg if isinstance(arg, list) else [arg])]
        return lambda v, present: present and not any(m(v, present) for m in excluded)
    raise FilterError(f"{path}: unknown matcher {kind!r} with argument {arg!r}")


def _compile_pattern(pattern: dict[str, Any], path: str) -> Callable[[Any], bool]:
    if not pattern:
        raise FilterError(f"{path}: empty pattern")
    fields: list[tuple[str, Callable[[Any], bool]]] = []
    for key, spec in pattern.items():
        where = f"{path}.{key}"
        if isinstance(spec, dict):
            fields.append((key, _compile_pattern(spec, where)))
            continue
        if not isinstance(spec, list) or not spec:
            raise FilterError(f"{where}: expected a non-empty list of matchers or a nested object")
        fields.append((key, _leaf([_compile_matcher(s, f"{where}[{i}]") for i, s in enumerate(spec)])))

    def match(obj: Any) -> bool:
        return all(check(obj.get(key, _MISSING) if isinstance(obj, dict) else _MISSING) for key, check in fields)
    return lambda obj: match(obj) if obj is not _MISSING else match({})


def _leaf(matchers: list[Matcher]) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        present = value is not _MISSING
        # Arrays in the record match when any element matches (EventBridge semantics).
        candidates = value if present and isinstance(value, list) else [value]
        if present and isinstance(value, list) and not value:
            return any(m(_MISSING, False) for m in matchers)
        return any(m(c, present) for c in candidates for m in matchers)
    return check


def parse_pattern(raw: dict[str, Any] | str, where: str = "pattern") -> dict[str, Any]:
    """A pattern given as an object or as a JSON string (Lambda's ``Filters[].Pattern``)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise FilterError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise FilterError(f"{where}: a pattern is a JSON object")
    return raw


class RecordFilter:
    """Compiled filter criteria: ``matches(doc)`` is True when any pattern matches (or there are none)."""

    def __init__(self, patterns: list[dict[str, Any] | str]) -> None:
        compiled = []
        for i, raw in enumerate(patterns):
            pattern = parse_pattern(raw, f"filter_criteria[{i}]")
            compiled.append(_compile_pattern(pattern, f"filter_criteria[{i}]"))
        self._patterns = compiled

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def matches(self, doc: dict[str, Any]) -> bool:
        """True when the record document passes the criteria."""
        return not self._patterns or any(p(doc) for p in self._patterns)
