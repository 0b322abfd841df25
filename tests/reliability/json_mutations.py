"""Hypothesis strategies that damage a valid JSON document the way files get damaged or edited:
a field deleted, replaced by any JSON value (NaN, huge ints, wrong types, deep nesting), a number
nudged by one, a string emptied, a list item dropped or repeated, or the whole text cut short."""

from __future__ import annotations

import copy
import json

from hypothesis import strategies as st

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=6) | st.sampled_from(["", "0" * 64, "images", "float16", "pool"]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=5)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _nudged(value):
    """Values close to `value` (the damage most likely to slip past type checks)."""
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, int):
        return st.sampled_from([value + 1, value - 1, 0, -1, -value, value * 1000])
    if isinstance(value, float):
        return st.sampled_from([value * 2, -value, 0.0, float("nan"), float("inf"), 1e308])
    if isinstance(value, str):
        return st.sampled_from(["", value[:-1], value + "x", value.upper()])
    if isinstance(value, list):
        return st.sampled_from([[], value[:-1], value + value[-1:], list(reversed(value))])
    return JSON_VALUES


@st.composite
def damaged(draw, doc, max_edits: int = 3):
    """A copy of `doc` with 1..max_edits edits."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, max_edits))):
        path = draw(st.sampled_from(list(_paths(doc))))
        old = _get(doc, path)
        op = draw(st.sampled_from(["replace", "nudge", "nudge", "delete"]))
        new = draw(JSON_VALUES if op == "replace" else _nudged(old))
        if not path:
            doc = new if op != "delete" else {}
            continue
        parent = _get(doc, path[:-1])
        if op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
    return doc


@st.composite
def damaged_text(draw, doc):
    """JSON text of `doc`, damaged as a document or as text (cut short, bytes flipped, nested deep)."""
    kind = draw(st.sampled_from(["doc", "doc", "doc", "cut", "flip", "deep", "bigint"]))
    text = json.dumps(doc, indent=2)
    if kind == "doc":
        return json.dumps(draw(damaged(doc)))
    if kind == "cut":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "flip":
        i = draw(st.integers(0, len(text) - 1))
        return text[:i] + draw(st.characters(exclude_categories=["Cs"])) + text[i + 1:]
    if kind == "deep":
        return "[" * 100_000 + "]" * 100_000
    return '{"format": ' + "9" * 5000 + "}"
