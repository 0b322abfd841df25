"""Schemas of the toolchain's JSON artifacts: the feature layout (ONNX metadata), the feature-cache
manifest and `task.json`. Loaders validate with `runtime.schema.validate`, so malformed or
adversarial input is a typed error naming the file and the field, never a KeyError deep inside.
"""

from __future__ import annotations

from runtime.errors import ArtifactError
from runtime.preprocess import PreprocessConfig
from runtime.schema import (
    SchemaMismatch,
    anything,
    boolean,
    const,
    integer,
    list_of,
    mapping_of,
    name,
    number,
    obj,
    one_of,
    sha256,
    string,
)

# Bounds that keep a malformed file from allocating absurd arrays (the widest real layouts,
# T=8192 over every tap of a large backbone, have ~10^5..10^6 features).
MAX_FEATURES = 1 << 27
FEATURE_DTYPES = ("float16", "float32")


def preprocess_config(value, where):
    """A `PreprocessConfig.to_dict()` object."""
    try:
        PreprocessConfig.from_dict(value, source="preprocess")
    except ArtifactError as exc:
        raise SchemaMismatch(where, f"is not a valid preprocessing config ({exc})") from None
    return value


def _contiguous_taps(layout: dict, where: str) -> None:
    offset, names = 0, set()
    for i, tap in enumerate(layout["taps"]):
        if tap["offset"] != offset:
            raise SchemaMismatch(f"{where}taps[{i}].offset", f"is {tap['offset']}, expected {offset} "
                                 "(taps are laid out back to back)")
        if tap["name"] in names:
            raise SchemaMismatch(f"{where}taps[{i}].name", f"repeats tap {tap['name']!r}")
        names.add(tap["name"])
        offset += tap["features"]
    if layout["total_features"] != offset:
        raise SchemaMismatch(f"{where}total_features", f"is {layout['total_features']}, the taps hold {offset}")


LAYOUT = obj(
    {
        "format": const("h2t-edge/backbone-layout"),
        "version": const(1),
        "backbone": string(),
        "weights": string(),
        "target_size": integer(min=1, max=MAX_FEATURES),
        "input": string(),
        "preprocess": preprocess_config,
        "pre_logits": string(),
        "total_features": integer(min=1, max=MAX_FEATURES),
        "taps": list_of(obj({"name": name(), "output": string(), "offset": integer(min=0, max=MAX_FEATURES),
                             "features": integer(min=1, max=MAX_FEATURES)}), min_len=1),
    },
    {"probe": list_of(number()), "cls_token": string()},
    rule=lambda v, where: _contiguous_taps(v, f"{where}." if where else ""),
)


def _multi_consistent(m: dict, where: str) -> None:
    sizes = sorted(str(t) for t in m["target_sizes"])
    if sorted(m["layouts"]) != sizes or sorted(m["outputs"]) != sizes:
        raise SchemaMismatch("layouts", f"and 'outputs' must have one entry per target size {m['target_sizes']}")
    for t in sizes:
        if m["layouts"][t]["target_size"] != int(t) or len(m["outputs"][t]) != len(m["layouts"][t]["taps"]):
            raise SchemaMismatch(f"layouts.{t}", "does not match its target size or its outputs")


MULTI_LAYOUT = obj(  # exporters.multi_export: one single-T layout and the tap outputs per target size
    {
        "format": const("h2t-edge/multi-target-layout"),
        "version": const(1),
        "target_sizes": list_of(integer(min=1, max=MAX_FEATURES), min_len=1, unique=True),
        "layouts": mapping_of(LAYOUT),
        "outputs": mapping_of(list_of(string(), min_len=1)),
    },
    rule=_multi_consistent,
)

BACKBONE_IDENTITY = obj({"name": string(), "weights": string(), "onnx_sha256": sha256()})


def _manifest_rows(m: dict, where: str) -> None:
    n, c = len(m["images"]), len(m["classes"])
    if len(m["labels"]) != n:
        raise SchemaMismatch("labels", f"has {len(m['labels'])} entries for {n} images")
    if any(label >= c for label in m["labels"]):
        raise SchemaMismatch("labels", f"must index the {c} classes")
    if any(s["index"] >= n for s in m["skipped"]):
        raise SchemaMismatch("skipped", f"must index the {n} images")
    if m["layout"]["total_features"] * max(n, 1) > 1 << 40:
        raise SchemaMismatch("layout.total_features", "times the image count exceeds 2^40 values")


_CACHE_FIELDS = {
    "format": const("h2t-edge/feature-cache"),
    "backbone": obj({"name": string(), "weights": string(), "onnx_sha256": sha256(), "onnx": string()}),
    "layout": LAYOUT,
    "dataset": obj({"source": string(nonempty=False), "fingerprint": sha256()}),
    "images": list_of(string()),
    "labels": list_of(integer(min=0)),
    "classes": list_of(string(nonempty=False), min_len=1),
    "dtype": one_of(*FEATURE_DTYPES),
    "batch_size": integer(min=1),
    "provider": string(),
    "skipped": list_of(obj({"index": integer(min=0), "path": string(), "error": string(nonempty=False)})),
    "complete": boolean(),
}


def _manifest_digests(m: dict, where: str) -> None:
    _manifest_rows(m, where)
    if not m["complete"]:
        return
    for key in ("batch_sha256", "labels_sha256"):
        if key not in m:
            raise SchemaMismatch(key, "is missing (a complete cache records the digests of its arrays)")
    batches = -(-len(m["images"]) // m["batch_size"])
    if len(m["batch_sha256"]) != batches:
        raise SchemaMismatch("batch_sha256", f"has {len(m['batch_sha256'])} digests for {batches} batches")


# Version 2: sealed (runtime.trust: content_sha256 always, `issued`), and a complete cache records
# the sha256 of every batch of rows of features.npy + valid.npy and of labels.npy.
CACHE_MANIFEST = obj(
    {**_CACHE_FIELDS, "version": const(2), "issued": integer(min=0), "content_sha256": sha256()},
    {"batch_sha256": list_of(sha256()), "labels_sha256": sha256()},
    rule=_manifest_digests,
)

# Version 1 (before the arrays carried digests): read only under an explicit allow_unverified.
CACHE_MANIFEST_V1 = obj({**_CACHE_FIELDS, "version": const(1)}, {"content_sha256": sha256()}, rule=_manifest_rows)


def _task_consistent(m: dict, where: str) -> None:
    if m["target_size"] != m["layout"]["target_size"]:
        raise SchemaMismatch("target_size", f"is {m['target_size']}, its layout says {m['layout']['target_size']}")
    if m["preprocess"] != m["layout"]["preprocess"]:
        raise SchemaMismatch("preprocess", "differs from the layout's preprocessing")
    if m["n_features"] > m["layout"]["total_features"]:
        raise SchemaMismatch("n_features", "exceeds the layout's total_features")


TASK = obj(
    {
        "format": const("h2t-edge/task"),
        "version": const(1),
        "task": name(),
        "method": string(),
        "classes": list_of(string(nonempty=False), min_len=2, unique=True),
        "n_features": integer(min=1, max=MAX_FEATURES),
        "features_per_tap": mapping_of(integer(min=0)),
        "target_size": integer(min=1),
        "preprocess": preprocess_config,
        "backbone": BACKBONE_IDENTITY,
        "config": mapping_of(anything()),
        "report": mapping_of(anything()),
        "layout": LAYOUT,
        "head_sha256": sha256(),
        "content_sha256": sha256(),
    },
    rule=_task_consistent,
)
