"""Fit: select features and train a task head on a feature cache, with CV (h2t_edge.selection).

Also the one keyed fit record. A fit depends on its features (the cache's manifest, which pins the
backbone export, layout, images, labels and dtype), its method(s), its grid and a few protocol
switches; `FitKey` names exactly that. `fit_step` keeps it in each head's task.json, `train` and
`eval` in small JSON records (`save_fit_record`); a rerun reuses a fit whose key is equal
(`load_fit_record`, `kept_head`) and refits anything else. That is how an interrupted fit,
train or eval resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from h2t_edge.core.artifacts import TaskHead
from h2t_edge.core.errors import H2TEdgeError, TaskArtifactError
from h2t_edge.core.progress import Progress
from h2t_edge.selection.names import HEAD2TOE, LINEAR
from h2t_edge.steps.extract import FeatureCache
from runtime.errors import H2TRuntimeError
from runtime.io import atomic_write_json, file_sha256, read_json

FIT_RECORD_FORMAT = "h2t-edge/fit-record"


def cache_identity(cache: FeatureCache) -> str:
    """sha256 of the cache's manifest.json: changes whenever the cache is extracted again."""
    return file_sha256(cache.root / "manifest.json")


@dataclass(frozen=True)
class FitKey:
    """What a kept fit depends on. Equal keys: the kept fit is reused; otherwise it is refitted."""

    cache_manifest_sha256: str
    methods: tuple[str, ...]
    grid: dict  # SearchGrid.to_dict(), as JSON reads it back
    extra: dict = field(default_factory=dict)  # protocol switches (train's guard, eval's test cache)

    @classmethod
    def of(cls, cache: FeatureCache, methods: str | Sequence[str], grid, *,
           allowed_taps: Sequence[str] | None = None, **extra: Any) -> "FitKey":
        """allowed_taps (`--taps-from`) enters the key only when given: keys without it stay as they were."""
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        if allowed_taps is not None:
            extra["allowed_taps"] = sorted(allowed_taps)
        return cls(cache_identity(cache), methods, json.loads(json.dumps(grid.to_dict())),
                   json.loads(json.dumps(extra)))

    def to_dict(self) -> dict:
        return {"cache_manifest_sha256": self.cache_manifest_sha256, "methods": list(self.methods),
                "grid": self.grid, **({"extra": self.extra} if self.extra else {})}

    def digest(self) -> str:
        """16 hex digits of the key's sha256: a file name for its record."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def load_fit_record(path: str | Path, key: FitKey) -> dict | None:
    """The record at PATH when it was written for `key`, else None (missing, foreign or stale)."""
    path = Path(path)
    if not path.is_file():
        return None
    record = read_json(path, "fit record")
    if isinstance(record, dict) and record.get("format") == FIT_RECORD_FORMAT and record.get("key") == key.to_dict():
        return record
    return None


def save_fit_record(path: str | Path, key: FitKey, payload: dict) -> dict:
    """Write PATH atomically: `payload` with the key. Write it last: it marks the fit complete."""
    record = {"format": FIT_RECORD_FORMAT, "version": 1, "key": key.to_dict(), **payload}
    atomic_write_json(Path(path), record)
    return record


def kept_head(head_dir: Path, key: FitKey) -> TaskHead | None:
    """The head an earlier (interrupted) fit wrote in HEAD_DIR for `key`, or None: a damaged or
    foreign head is fitted again and overwritten."""
    if not (head_dir / "task.json").is_file():
        return None
    try:
        head = TaskHead.load(head_dir)
    except (H2TEdgeError, H2TRuntimeError):
        return None
    return head if head.report.get("fit_key") == key.to_dict() else None


def backbone_identity(cache: FeatureCache) -> dict:
    """What a task records of the graph its features came from: name, weights, sha256, and for a
    graph built at a precision its record with the graph's path (`compile` cuts the task graph
    from that file, checked by the sha256)."""
    backbone = {k: v for k, v in cache.manifest["backbone"].items() if k != "onnx"}
    if "precision" in backbone:
        backbone["precision"] = {**backbone["precision"], "graph": cache.manifest["backbone"]["onnx"]}
    return backbone


def head_from_fit(result, cache: FeatureCache, task: str, offset: int, grid, key: FitKey | None = None) -> TaskHead:
    """The task artifact of a `FitResult` on `cache`; `offset` shifts its columns (LINEAR reads the
    pre-logits, which start at `offset` in the cache's columns)."""
    return TaskHead(
        task=task,
        method=result.method,
        classes=list(cache.classes),
        features=np.asarray(result.head.features, dtype=np.int64) + offset,
        weight=result.head.weight,
        bias=result.head.bias,
        layout=cache.layout,
        backbone=backbone_identity(cache),
        config={**result.config, "grid": grid.to_dict()},
        report={"cv_table": result.cv_table, "fit_seconds": result.fit_seconds,
                "train_examples": int(cache.valid.sum()), "cache_manifest_sha256": cache_identity(cache),
                **({"fit_key": key.to_dict()} if key is not None else {})},
    )


@dataclass
class FitReport:
    heads: dict[str, TaskHead]
    cv: dict[str, list[dict]]
    seconds: dict[str, float]
    out: Path


def fit_step(
    cache_dir: str | Path, out: str | Path, *, task: str | None = None,
    methods: Sequence[str] = (HEAD2TOE, LINEAR), grid=None, progress: Progress | None = None,
    allowed_taps: Sequence[str] | None = None,
) -> FitReport:
    """Fit the requested methods on a feature cache; writes `OUT/<method>/` task artifacts and
    OUT/report.json with the CV tables. A method whose artifact `OUT/<method>/` is already there, from
    the same cache, task and grid, is kept, not refitted: rerunning an interrupted fit resumes it.
    allowed_taps: HEAD2TOE reads only these taps (and the pre-logits); see `device_taps`."""
    from h2t_edge.selection import SearchGrid  # torch: imported when a fit runs, not with the pipeline
    from h2t_edge.selection.methods import get_method

    grid = grid or SearchGrid.paper()
    cache = FeatureCache.open(cache_dir)
    out = Path(out)
    task = task or out.name
    heads, cv, seconds = {}, {}, {}
    for name in methods:
        method = get_method(name, error=TaskArtifactError)
        key = FitKey.of(cache, method.name, grid, task=task, allowed_taps=allowed_taps)
        done = kept_head(out / method.name.lower(), key)
        if done is not None:
            heads[method.name], cv[method.name], seconds[method.name] = (
                done, done.report["cv_table"], done.report["fit_seconds"])
            continue
        columns = method.columns(cache.layout)
        x, y = cache.arrays(columns)
        result = method.fit(x, y, len(cache.classes), grid, progress, layout=cache.layout,
                            allowed_taps=allowed_taps if method.reads == "all" else None)
        head = head_from_fit(result, cache, task, columns.start if columns is not None else 0, grid, key)
        head.save(out / method.name.lower())
        heads[method.name], cv[method.name], seconds[method.name] = head, result.cv_table, result.fit_seconds
    atomic_write_json(out / "report.json", {
        "task": task, "cache": str(Path(cache_dir).resolve()),
        "methods": {m: {"config": heads[m].config, "n_features": int(len(heads[m].features)),
                        "candidates": cache.layout.total_features, "fit_seconds": seconds[m],
                        "cv_table": cv[m]} for m in heads},
    })
    return FitReport(heads, cv, seconds, out)


def accuracy(head: TaskHead, cache: FeatureCache) -> float:
    """Test accuracy of a fitted head on a cache from the same backbone."""
    check_same_backbone(head, cache)
    x, y = cache.arrays()
    return float((head.logits(x).argmax(1) == y).mean())


def check_same_backbone(head: TaskHead, cache: FeatureCache) -> None:
    """Refuse a head and a cache from different backbone exports or layouts."""
    if head.backbone["onnx_sha256"] != cache.backbone_sha256 or head.layout != cache.layout:
        raise TaskArtifactError(
            f"task {head.task!r} was fitted on features of another backbone or layout than the cache "
            f"{cache.root}; extract the features with the same exported backbone"
        )


