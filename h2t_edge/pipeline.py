"""The five steps as one API: export -> extract -> fit -> compile -> predict.

Each function takes plain paths and options, writes its artifact atomically and returns a small
report. The CLI (`h2t_edge.cli`) only parses arguments and prints these reports.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.io import atomic_write_bytes, atomic_write_files, atomic_write_json, file_sha256
from runtime.schema import content_sha256

from .artifacts import TaskHead
from .errors import TaskArtifactError
from .features import FeatureCache

if TYPE_CHECKING:
    from exporters.compile import TaskGraphSummary

Progress = Callable[[str, int, int], None]


@dataclass
class ExportReport:
    path: Path
    layout: dict
    sha256: str
    bytes: int
    seconds: float


def export_step(
    backbone: str, out: str | Path, target_size: int = 512, weights: str = "bundled",
    taps: Sequence[str] | None = None, cls_token: str = "pool",
) -> ExportReport:
    """Export `backbone` with pooled, normalised taps to the ONNX file `out`.

    cls_token: for token taps (ViT), pool the class token with the rest ('pool'), use it alone
    ('only') or keep it unpooled beside the pooled patch tokens ('separate')."""
    from exporters.backbones import load_backbone
    from exporters.export import export_backbone

    start = time.perf_counter()
    bb = load_backbone(backbone, weights=weights)
    model, layout = export_backbone(bb, target_size, taps, cls_token=cls_token)
    path = Path(out)
    atomic_write_bytes(path, model.SerializeToString())
    return ExportReport(path, layout, file_sha256(path), path.stat().st_size, time.perf_counter() - start)


@dataclass
class FitReport:
    heads: dict[str, TaskHead]
    cv: dict[str, list[dict]]
    seconds: dict[str, float]
    out: Path


def _head_from_fit(result, cache: FeatureCache, task: str, offset: int, grid) -> TaskHead:
    return TaskHead(
        task=task,
        method=result.method,
        classes=list(cache.classes),
        features=np.asarray(result.head.features, dtype=np.int64) + offset,
        weight=result.head.weight,
        bias=result.head.bias,
        layout=cache.layout,
        backbone={k: v for k, v in cache.manifest["backbone"].items() if k != "onnx"},
        config={**result.config, "grid": grid.to_dict()},
        report={"cv_table": result.cv_table, "fit_seconds": result.fit_seconds,
                "train_examples": int(cache.valid.sum()), "cache_manifest_sha256": _cache_identity(cache)},
    )


def _cache_identity(cache: FeatureCache) -> str:
    return file_sha256(cache.root / "manifest.json")


def _finished_fit(head_dir: Path, cache: FeatureCache, task: str, method: str, grid) -> TaskHead | None:
    """The head an earlier (interrupted) `fit_step` already wrote for this cache, task, method and
    grid, or None: a rerun after a kill refits only the methods that were not saved yet."""
    from runtime.errors import H2TRuntimeError

    from .errors import H2TEdgeError

    if not (head_dir / "task.json").is_file():
        return None
    try:
        head = TaskHead.load(head_dir)
    except (H2TEdgeError, H2TRuntimeError):
        return None  # damaged or foreign: fit again and overwrite it
    same = (head.task == task and head.method == method
            and head.report.get("cache_manifest_sha256") == _cache_identity(cache)
            and head.config.get("grid") == json.loads(json.dumps(grid.to_dict())))
    return head if same else None


def fit_step(
    cache_dir: str | Path, out: str | Path, *, task: str | None = None,
    methods: Sequence[str] = ("HEAD2TOE", "LINEAR"), grid=None, progress: Progress | None = None,
) -> FitReport:
    """Fit the requested methods on a feature cache; writes OUT/<method>/ task artifacts and
    OUT/report.json with the CV tables. A method whose artifact OUT/<method>/ is already there, from
    the same cache, task and grid, is kept, not refitted: rerunning an interrupted fit resumes it."""
    from .select import SearchGrid, fit_head2toe, fit_linear

    grid = grid or SearchGrid.paper()
    cache = FeatureCache.open(cache_dir)
    out = Path(out)
    task = task or out.name
    n_classes = len(cache.classes)
    heads, cv, seconds = {}, {}, {}
    for method in methods:
        done = _finished_fit(out / method.lower(), cache, task, method, grid)
        if done is not None:
            heads[method], cv[method], seconds[method] = done, done.report["cv_table"], done.report["fit_seconds"]
            continue
        if method == "HEAD2TOE":
            x, y = cache.arrays()
            result = fit_head2toe(x, y, n_classes, grid=grid, progress=progress)
            offset = 0
        elif method == "LINEAR":
            columns = cache.tap_columns(cache.layout["pre_logits"])
            x, y = cache.arrays(columns)
            result = fit_linear(x, y, n_classes, grid=grid, progress=progress)
            offset = columns.start
        else:
            raise TaskArtifactError(f"unknown method {method!r}; choose HEAD2TOE or LINEAR")
        head = _head_from_fit(result, cache, task, offset, grid)
        head.save(out / method.lower())
        heads[method], cv[method], seconds[method] = head, result.cv_table, result.fit_seconds
    atomic_write_json(out / "report.json", {
        "task": task, "cache": str(Path(cache_dir).resolve()),
        "methods": {m: {"config": heads[m].config, "n_features": int(len(heads[m].features)),
                        "candidates": int(cache.layout["total_features"]), "fit_seconds": seconds[m],
                        "cv_table": cv[m]} for m in heads},
    })
    return FitReport(heads, cv, seconds, out)


def accuracy(head: TaskHead, cache: FeatureCache) -> float:
    """Test accuracy of a fitted head on a cache from the same backbone."""
    check_same_backbone(head, cache)
    x, y = cache.arrays()
    return float((head.logits(x).argmax(1) == y).mean())


def check_same_backbone(head: TaskHead, cache: FeatureCache) -> None:
    if head.backbone["onnx_sha256"] != cache.backbone_sha256 or head.layout != cache.layout:
        raise TaskArtifactError(
            f"task {head.task!r} was fitted on features of another backbone or layout than the cache "
            f"{cache.root}; extract the features with the same exported backbone"
        )


@dataclass
class CompileReport:
    path: Path
    bytes: int
    summary: "TaskGraphSummary"  # taps used, segments and parameters kept (exporters.compile)
    seconds: float
    sidecar: dict = field(default_factory=dict)


def compile_step(task_dir: str | Path, out: str | Path, weights: str | None = None) -> CompileReport:
    """Compile a task artifact into OUT.onnx + OUT.json (the runtime's sidecar)."""
    from exporters.backbones import load_backbone
    from exporters.compile import OUTPUT_NAMES, compile_task_graph

    start = time.perf_counter()
    head = TaskHead.load(task_dir)
    source = weights or _weights_source(head.backbone["weights"])
    bb = load_backbone(head.backbone["name"], weights=source)
    model, summary = compile_task_graph(bb, head.layout, head.features, head.weight, head.bias)
    path = Path(out)
    if path.suffix != ".onnx":
        path = path.with_suffix(".onnx")
    blob = model.SerializeToString()
    sidecar = {
        "format": "h2t-edge/task-graph",
        "version": 1,
        "task": head.task,
        "method": head.method,
        "classes": head.classes,
        "preprocess": head.layout["preprocess"],
        "input": "images",
        "outputs": {"probabilities": OUTPUT_NAMES[0], "logits": OUTPUT_NAMES[1]},
        "backbone": head.backbone,
        "graph_sha256": hashlib.sha256(blob).hexdigest(),
        "taps_used": summary.taps_used,
        "n_features": int(len(head.features)),
        "segments_kept": summary.segments_kept,
        "segments_total": summary.segments_total,
    }
    write_task_graph(path, blob, sidecar)
    return CompileReport(path, path.stat().st_size, summary, time.perf_counter() - start, sidecar)


def write_task_graph(path: Path, blob: bytes, sidecar: dict) -> None:
    """Sign `sidecar` (its `content_sha256` is set here; edits are refused at load) and write the task
    graph PATH (.onnx) with it as PATH.json. Both are staged before either replaces an old one, so a
    failed write keeps the previous pair."""
    sidecar["content_sha256"] = content_sha256(sidecar, "content_sha256")
    atomic_write_files({path: blob, path.with_suffix(".json"): (json.dumps(sidecar, indent=2) + "\n").encode()})


def _weights_source(provenance: str) -> str:
    """Turn a layout's weight provenance back into a `load_backbone` weights argument."""
    if provenance.startswith("bundled:"):
        return "bundled"
    if provenance.startswith("file:"):
        return provenance[len("file:"):]
    return provenance
