"""Declarative checks for the JSON artifacts (feature-cache manifest, task.json, sidecars, layouts).

A schema is a function `check(value, where) -> value` that raises `SchemaMismatch` naming the
field path (`where`, e.g. "taps[2].offset") and what is wrong with it. `validate` runs one and
turns a mismatch into the caller's typed error naming the file, the field and the fix, so every
loader reports malformed input the same way and no KeyError/TypeError escapes from deep inside.

    LAYOUT = obj({"target_size": integer(min=1), "taps": list_of(obj({"name": string()}), min_len=1)})
    layout = validate(data, LAYOUT, what="feature layout", source=path, error=CacheError,
                      fix="export the backbone again")

Objects keep keys the schema does not name (later versions may add fields); numbers must be
finite (JSON parsers accept NaN and Infinity) and booleans are not integers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Check = Callable[[Any, str], Any]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SchemaMismatch(Exception):
    """A value that does not fit its schema; `where` is the field path, `why` the reason."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def validate(data: Any, schema: Check, *, what: str, source: Any, error: type[Exception], fix: str) -> Any:
    """Check `data` against `schema`; raise `error` ("<what> <source>: field 'x' ...; <fix>")."""
    try:
        return schema(data, "")
    except SchemaMismatch as exc:
        field = f"field '{exc.where}'" if exc.where else "the top level"
        raise error(f"{what} {source}: {field} {exc.why}; {fix}") from None
    except RecursionError:
        raise error(f"{what} {source} is nested too deeply to be an h2t-edge artifact; {fix}") from None


def anything() -> Check:
    return lambda value, where: value


def string(nonempty: bool = True) -> Check:
    def check(value, where):
        if not isinstance(value, str):
            raise SchemaMismatch(where, f"must be a string, got {_kind(value)}")
        if nonempty and not value:
            raise SchemaMismatch(where, "must be a non-empty string")
        return value
    return check


def integer(min: int | None = None, max: int | None = None) -> Check:
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaMismatch(where, f"must be an integer, got {_kind(value)}")
        if min is not None and value < min:
            raise SchemaMismatch(where, f"must be >= {min}, got {value}")
        if max is not None and value > max:
            raise SchemaMismatch(where, f"must be <= {max}, got {value}")
        return value
    return check


def number(positive: bool = False) -> Check:
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaMismatch(where, f"must be a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise SchemaMismatch(where, f"must be a finite number, got {value}")
        if positive and value <= 0:
            raise SchemaMismatch(where, f"must be positive, got {value}")
        return value
    return check


def boolean() -> Check:
    def check(value, where):
        if not isinstance(value, bool):
            raise SchemaMismatch(where, f"must be true or false, got {_kind(value)}")
        return value
    return check


def const(expected: Any) -> Check:
    def check(value, where):
        if type(value) is not type(expected) or value != expected:
            raise SchemaMismatch(where, f"must be {expected!r}, got {value!r}"[:200])
        return value
    return check


def one_of(*choices: str) -> Check:
    def check(value, where):
        if not isinstance(value, str) or value not in choices:
            raise SchemaMismatch(where, f"must be one of {list(choices)}, got {value!r}"[:200])
        return value
    return check


def sha256() -> Check:
    def check(value, where):
        if not is_sha256(value):
            raise SchemaMismatch(where, "must be a sha256 (64 lowercase hex digits)")
        return value
    return check


def optional(inner: Check) -> Check:
    """null is accepted as well as what `inner` accepts."""
    return lambda value, where: None if value is None else inner(value, where)


def list_of(item: Check, min_len: int = 0, unique: bool = False) -> Check:
    def check(value, where):
        if not isinstance(value, list):
            raise SchemaMismatch(where, f"must be a list, got {_kind(value)}")
        if len(value) < min_len:
            raise SchemaMismatch(where, f"must have at least {min_len} item(s), got {len(value)}")
        out = [item(v, _join(where, i)) for i, v in enumerate(value)]
        if unique and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            raise SchemaMismatch(where, "must not repeat an item")
        return out
    return check


def mapping_of(value_check: Check) -> Check:
    """An object with any string keys, each value checked by `value_check`."""
    def check(value, where):
        if not isinstance(value, dict):
            raise SchemaMismatch(where, f"must be an object, got {_kind(value)}")
        return {k: value_check(v, _join(where, k)) for k, v in value.items()}
    return check


def obj(fields: Mapping[str, Check], optional_fields: Mapping[str, Check] | None = None,
        rule: Callable[[dict, str], None] | None = None) -> Check:
    """An object with the required `fields`, the `optional_fields` when present, and any other keys.

    rule(value, where): a cross-field check run after the fields; it raises SchemaMismatch.
    """
    optional_fields = optional_fields or {}

    def check(value, where):
        if not isinstance(value, dict):
            raise SchemaMismatch(where, f"must be an object, got {_kind(value)}")
        for key, sub in fields.items():
            if key not in value:
                raise SchemaMismatch(_join(where, key), "is missing")
            sub(value[key], _join(where, key))
        for key, sub in optional_fields.items():
            if key in value:
                sub(value[key], _join(where, key))
        if rule is not None:
            rule(value, where)
        return value
    return check


def is_digest(value: Any) -> bool:
    """Whether `value` is a file digest as h2t-edge writes it (sha256 or BLAKE3): 64 lowercase hex digits."""
    return is_sha256(value)


# The one rule for names that come from artifacts (task, tap, model names): they become file and folder
# names and URL segments, so a name is one path component of safe characters, never '.', '..', a
# path or an absolute path.
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def is_name(value: Any) -> bool:
    """Whether `value` passes NAME_RULE (letters, digits, '_', '.', '-'; 1..128; no leading '.')."""
    return isinstance(value, str) and bool(NAME_RULE.match(value))


def name() -> Check:
    """A task, tap or model name (NAME_RULE)."""
    def check(value, where):
        if not is_name(value):
            raise SchemaMismatch(where, f"is {str(value)[:80]!r}, not a valid name (1 to 128 letters, digits, '_', "
                                 "'.', '-', not starting with '.'; a name is never a path)")
        return value
    return check


def is_sha256(value: Any) -> bool:
    """Whether `value` is a sha256 as h2t-edge writes it: 64 lowercase hex digits."""
    return isinstance(value, str) and bool(_HEX64.match(value))


def canonical_bytes(data: Mapping[str, Any], exclude: Iterable[str] = ()) -> bytes:
    """The canonical JSON of `data` without the keys in `exclude` (sorted keys, no spaces, UTF-8):
    what every content digest and signature of an h2t-edge artifact is computed over."""
    skip = set(exclude)
    rest = {k: v for k, v in data.items() if k not in skip}
    return json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8", "surrogatepass")


def content_sha256(data: Mapping[str, Any], field: str) -> str:
    """sha256 of a JSON object's canonical form without `field` (the field that stores it), so a
    file can carry the checksum of its own content."""
    return hashlib.sha256(canonical_bytes(data, (field,))).hexdigest()
