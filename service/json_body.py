"""Parsing the JSON of a submission within bounds, and refusing text UTF-8 cannot carry.

- Every array and object holds at most `max_items` members, counted while parsing: a
  body of millions of numbers is refused at the first member past the bound, before it
  is all built (the longest list a submission may carry is `trained_betas`, at most
  `num_train_timesteps` entries, itself at most INVERSION_MAX_TRAIN_TIMESTEPS).
- Every string, member names included, must be encodable as UTF-8. JSON's `\\ud800`
  escape decodes to a lone surrogate, which Python keeps in a str but no encoder takes:
  left in, it fails later (hashing a webhook URL, writing the job, answering the error)
  as a 500. It is refused here, naming the field that carries it.

The standard library's decoder with its parse_array and parse_object wrapped (its pure
Python scanner, which calls them; strings are still scanned by its C scanstring).
"""

from __future__ import annotations

import json
from json.decoder import JSONArray, JSONObject
from json.scanner import py_make_scanner
from typing import Any


class BodyRefused(ValueError):
    """A JSON body outside the bounds; `field` names where, None for the body itself."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _TooMany(Exception):
    pass


def _counted(scan_once: Any, limit: int) -> Any:
    """`scan_once` that raises _TooMany on its call past `limit`: one call per member."""
    count = 0

    def scan(string: str, index: int) -> Any:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooMany
        return scan_once(string, index)

    return scan


class _BoundedDecoder(json.JSONDecoder):
    def __init__(self, max_items: int) -> None:
        super().__init__()

        def parse_array(s_and_end: Any, scan_once: Any) -> Any:
            return JSONArray(s_and_end, _counted(scan_once, max_items))

        def parse_object(s_and_end: Any, strict: bool, scan_once: Any, *rest: Any) -> Any:
            return JSONObject(s_and_end, strict, _counted(scan_once, max_items), *rest)

        self.parse_array = parse_array
        self.parse_object = parse_object
        self.scan_once = py_make_scanner(self)


def loads(text: str | bytes, max_items: int) -> Any:
    """The JSON value of `text`, each array and object at most `max_items` members, every
    string encodable; BodyRefused otherwise (field None: the body is not valid JSON or
    holds too many members, the field is named by `check_text`)."""
    if isinstance(text, bytes):
        try:
            text = text.decode(json.detect_encoding(text))
        except UnicodeDecodeError as exc:
            raise BodyRefused(None, f"is not valid JSON: {exc}") from None
    try:
        value = _BoundedDecoder(max_items).decode(text)
    except _TooMany:
        raise BodyRefused(
            None, f"holds a list or object of more than {max_items} members (the limit)"
        ) from None
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise BodyRefused(None, f"is not valid JSON: {exc}") from None
    return value


def printable(name: str) -> str:
    """`name` with what UTF-8 cannot encode written as `\\udXXX` escapes."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, field: str | None = None) -> None:
    """BodyRefused naming the field of the first string, member name or value, that UTF-8
    cannot encode (a lone surrogate). A member's field is its name, nested ones joined
    with dots (`scheduler.beta_start`); a bad name is named with its escapes written out."""
    if isinstance(value, str):
        if not _encodable(value):
            raise BodyRefused(field, "holds a lone surrogate (\\ud800-\\udfff), not text")
    elif isinstance(value, dict):
        for name, item in value.items():
            path = name if field is None else f"{field}.{name}"
            if not _encodable(name):
                raise BodyRefused(
                    printable(path), "a field name holds a lone surrogate (\\ud800-\\udfff)"
                )
            check_text(item, path)
    elif isinstance(value, list):
        for item in value:
            check_text(item, field)
