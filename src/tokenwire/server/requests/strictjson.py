"""Strict JSON for every door (WebSocket frames, HTTP bodies, Realtime events). Pure, no I/O.

Python's ``json`` accepts text that the rest of the server cannot use: ``1e999`` parses to ``inf``, a 4,000-digit
integer parses but cannot become a float (and costs quadratic time to convert), ``NaN`` parses but is no JSON, a
lone ``\\ud800`` escape is no Unicode character, and a value nested hundreds of levels deep makes every later
recursive walk (validation, echoing it back) blow the stack. :func:`loads` refuses each of these with a
:class:`JSONInputError` that says what was wrong and, where it can, names the field: a parsed value is always
finite, convertible, encodable and shallow.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # objects and lists nested deeper than this are refused (no request needs more than ~4)
MAX_DIGITS = 400  # a JSON number with more characters than this is out of range for every field


class JSONInputError(ValueError):
    """Input that no request can be made of. ``syntax``: it is not JSON at all (``invalid_json``); otherwise it is
    JSON holding a value out of range, too deep or not Unicode (``invalid_request``), at ``param`` if known."""

    def __init__(self, message: str, *, syntax: bool, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.syntax = syntax
        self.param = param


class _OutOfRange:
    """Stands in for a number that parsed but cannot be used; :func:`check` reports where it is."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _float(text: str) -> float | _OutOfRange:
    if len(text) > MAX_DIGITS:
        return _OutOfRange(text)
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange(text)


def _int(text: str) -> int | _OutOfRange:
    if len(text) > MAX_DIGITS:  # before int(): converting a huge digit string is itself slow
        return _OutOfRange(text)
    value = int(text)
    try:
        float(value)
    except OverflowError:
        return _OutOfRange(text)
    return value


def loads(data: str | bytes, what: str = "the message") -> Any:
    """Parse ``data``; raises :class:`JSONInputError` naming the problem (``what`` names the whole input)."""
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise JSONInputError(f"{what} is not UTF-8 text", syntax=True) from None
    try:
        value = json.loads(data, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise JSONInputError(f"{what} is nested more than {MAX_DEPTH} levels deep", syntax=False) from None
    except ValueError as exc:
        raise JSONInputError(f"{what} is not valid JSON: {exc}", syntax=True) from None
    check(value, what)
    return value


def check(value: Any, what: str = "the message") -> None:
    """Refuse numbers out of range, nesting deeper than :data:`MAX_DEPTH` and strings holding a lone UTF-16
    surrogate escape (which no tokenizer can encode and no reply could echo), naming the field. Iterative: no
    input can exhaust the stack."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            _require_unicode(item, path, what)
        elif isinstance(item, _OutOfRange):
            raise JSONInputError(
                f'"{path}" is out of range: {item.text}' if path else f"{what} is out of range: {item.text}",
                syntax=False,
                param=path or None,
            )
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                top = path.split(".", 1)[0].split("[", 1)[0]
                raise JSONInputError(
                    f"{what} is nested more than {MAX_DEPTH} levels deep" + (f' (in "{top}")' if top else ""),
                    syntax=False,
                    param=top or None,
                )
            if isinstance(item, dict):
                for k, v in item.items():
                    _require_unicode(k, path, what)
                    stack.append((v, depth + 1, f"{path}.{k}" if path else k))
            else:
                stack.extend((v, depth + 1, f"{path}[{i}]") for i, v in enumerate(item))


def _require_unicode(text: str, path: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = f'"{path}"' if path else what
        raise JSONInputError(
            f"{where} holds a lone UTF-16 surrogate escape, which is not valid Unicode", syntax=True, param=path or None
        ) from None
