"""The one reader of JSON that comes from outside, and the one cleaner of text kept from outside.

Every body another party sends us (a provider's callback, its submit and status answers, an app's
request, the sandbox service's requests) is read by `read_json`. It takes exactly what our databases and
our encoder can hold: UTF-8 text (a byte order mark aside), finite numbers of a sane size, strings
without unpaired surrogates, nesting no deeper than MAX_DEPTH. Anything else is refused, with the
top-level field at fault where there is one, so a row that would break a later read or write is never
made. `storable` is the second line: text from outside is cleaned where it is recorded.

Pure functions only (no I/O): the provider translators use it too.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import msgspec

MAX_DEPTH = 32  # levels of JSON nesting a stored value may have (CONTRACT.md v2, request limits)
BOM = b"\xef\xbb\xbf"
# What neither database can hold in a text column: NUL (PostgreSQL) and unpaired surrogates (UTF-8).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"\s*:?|[\[\]{}]')
_decoder = msgspec.json.Decoder()


class UnreadableJson(ValueError):
    """A body `read_json` refuses. `field` names the top-level field at fault, when one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def read_json(raw: bytes | str) -> Any:
    """The JSON value of `raw`, or UnreadableJson saying why not. Big integers stay exact."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if data.startswith(BOM):
        data = data[len(BOM) :]
    try:
        value = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        # msgspec refuses everything a database or encoder cannot take (and some plain syntax
        # errors): the json module, which reads more, only tells which it was and where.
        raise _diagnosis(data, str(exc)) from None
    except RecursionError:
        raise _too_deep(data) from None
    for name, item in _fields(value):
        if _deeper_than(item, MAX_DEPTH):
            raise UnreadableJson(f"nested deeper than {MAX_DEPTH} levels", name)
    return value


def read_object(raw: bytes | str) -> dict[str, Any]:
    """`read_json` for a body that must be a JSON object."""
    value = read_json(raw)
    if not isinstance(value, dict):
        raise UnreadableJson("not a JSON object")
    return value


def storable(text: str) -> str:
    """`text` as a database can keep it: NUL and unpaired surrogates become U+FFFD."""
    if text.isascii() and "\x00" not in text:
        return text
    return UNSTORABLE.sub("\ufffd", text)


def storable_json(value: Any) -> Any:
    """A JSON value with every string (keys too) made `storable`."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, list):
        return [storable_json(item) for item in value]
    if isinstance(value, dict):
        return {storable(str(key)): storable_json(item) for key, item in value.items()}
    return value


def printable(text: str) -> str:
    """`text` with any unpaired surrogate spelled as an escape, so it can be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_problem(value: Any, depth: int = 1) -> str | None:
    """Why a parsed JSON value cannot be stored and echoed back as JSON, or None when it can:
    NaN or Infinity, a string with an unpaired surrogate, or nesting deeper than MAX_DEPTH."""
    if isinstance(value, float):
        return None if math.isfinite(value) else "NaN and Infinity are not JSON numbers"
    if isinstance(value, str):
        return None if _encodable(value) else "a string holds an unpaired surrogate"
    if isinstance(value, dict | list):
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            for key in value:
                if not _encodable(key):
                    return "a key holds an unpaired surrogate"
        for item in value.values() if isinstance(value, dict) else value:
            problem = json_problem(item, depth + 1)
            if problem:
                return problem
    return None


def deep_field(raw: bytes) -> str | None:
    """The top-level field of a JSON object too deeply nested to parse at all, found by a scan of its
    brackets and strings that stops at the first level past MAX_DEPTH; None when none is found."""
    depth, field = 0, None
    for match in JSON_TOKEN.finditer(raw):
        token = match.group()
        if token in (b"{", b"["):
            depth += 1
            if depth > MAX_DEPTH + 1:
                return field
        elif token in (b"}", b"]"):
            depth -= 1
        elif depth == 1 and token.endswith(b":"):
            try:
                field = printable(json.loads(token.rstrip(b": \t\r\n")))
            except ValueError:
                return None
    return None


def _diagnosis(data: bytes, refusal: str) -> UnreadableJson:
    """Why msgspec refused `data`, in words an app or an operator can act on."""
    try:
        text = data.decode("utf-8", "surrogatepass")  # an encoded surrogate is named as such below
    except UnicodeDecodeError:
        return UnreadableJson("the body is not UTF-8 text")
    try:
        value = json.loads(text)
    except RecursionError:
        return _too_deep(data)
    except ValueError:
        return UnreadableJson(f"the body is not JSON: {refusal}")
    if isinstance(value, str | float):
        problem = json_problem(value)
        if problem:
            return UnreadableJson(problem)
    for name, item in _fields(value):
        problem = json_problem(item) if _encodable(name) else "a key holds an unpaired surrogate"
        if problem:
            return UnreadableJson(problem, printable(name))
    return UnreadableJson(f"the body is not JSON we can read: {refusal}")


def _too_deep(data: bytes) -> UnreadableJson:
    return UnreadableJson(f"nested deeper than {MAX_DEPTH} levels", deep_field(data) or "body")


def _fields(value: Any) -> list[tuple[str, Any]]:
    """A body's top-level fields (an array's items named by index): what errors name."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, list):
        return [(f"[{index}]", item) for index, item in enumerate(value)]
    return []


def _deeper_than(value: Any, levels: int) -> bool:
    """Whether `value` nests containers more than `levels` deep (it stops looking past that)."""
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return False
    if levels <= 0:
        return True
    return any(_deeper_than(item, levels - 1) for item in items)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
