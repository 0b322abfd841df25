"""Deploy several tasks on one backbone, in either of two forms.

- `compile_tasks_step`: one ONNX graph for N tasks (`h2t-edge compile A B C -o tasks.onnx`). The
  backbone runs once, up to the deepest tap any task reads; each tap is pooled and normalised once;
  there is one logits output per task, named after it. The sidecar (version 2) lists each task's
  classes and output; `runtime.Predictor` loads it like a single-task graph.
- `package_shared_step`: the backbone with all its taps once (`backbone.onnx`, the graph the features
  were extracted with) and a tiny head per task (`heads/TASK.safetensors` + `heads/TASK.json`);
  `runtime.heads.SharedBackbonePredictor` composes them with numpy. Adding a task to a device is
  copying its two head files (`h2t-edge deploy NEW_TASK -o DIR` writes only those when DIR has the
  backbone already).

Tasks can share a graph only when they were fitted on features of the same exported backbone
(same sha256 and layout); anything else is refused with an error naming both tasks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.heads import BACKBONE_FORMAT, HEAD_FORMAT, layout_sha256
from runtime.io import atomic_write_files, file_sha256, read_json
from runtime.predictor import MULTITASK_SIDECAR_VERSION, SIDECAR_FORMAT

from .artifacts import TaskHead
from .errors import TaskArtifactError
from .pipeline import CompileReport, _weights_source


class DeployError(TaskArtifactError):
    """Tasks that cannot be deployed together (other backbone exports, clashing names)."""


def load_tasks(task_dirs: Sequence[str | Path]) -> list[TaskHead]:
    """Load task artifacts and check that they can share one backbone: same export, unique names."""
    if not task_dirs:
        raise DeployError("no task directories given")
    heads = [TaskHead.load(d) for d in task_dirs]
    first, first_dir = heads[0], Path(task_dirs[0])
    for head, where in zip(heads[1:], task_dirs[1:]):
        same_export = head.backbone.get("onnx_sha256") == first.backbone.get("onnx_sha256")
        if not same_export or head.layout != first.layout:
            raise DeployError(
                f"task {head.task!r} ({where}) was fitted on backbone export {_describe(head)} but task "
                f"{first.task!r} ({first_dir}) on {_describe(first)}; tasks on one backbone pass need features "
                "from the same exported backbone: re-extract and re-fit one of them with the other's backbone .onnx"
            )
    names = [h.task for h in heads]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        dirs = [str(d) for d, h in zip(task_dirs, heads) if h.task in twice]
        raise DeployError(f"task name(s) {twice} appear more than once ({', '.join(dirs)}); each task's output is "
                          "named after it: re-fit one with `fit --task OTHER_NAME`")
    return heads


def _describe(head: TaskHead) -> str:
    sha = str(head.backbone.get("onnx_sha256", "?"))[:12]
    return f"{head.backbone.get('name')} sha256 {sha}... (T={head.layout.get('target_size')})"


@dataclass
class MultiTaskCompileReport(CompileReport):
    tasks: list[str] = field(default_factory=list)


def compile_tasks_step(task_dirs: Sequence[str | Path], out: str | Path, weights: str | None = None) -> MultiTaskCompileReport:
    """Compile several task artifacts into one multi-task graph OUT.onnx + OUT.json (sidecar version 2)."""
    from exporters.backbones import load_backbone
    from exporters.compile import HeadSpec, compile_multitask_graph

    start = time.perf_counter()
    heads = load_tasks(task_dirs)
    first = heads[0]
    bb = load_backbone(first.backbone["name"], weights=weights or _weights_source(first.backbone["weights"]))
    specs = [HeadSpec(h.task, h.features, h.weight, h.bias) for h in heads]
    model, summary = compile_multitask_graph(bb, first.layout, specs)
    path = Path(out)
    if path.suffix != ".onnx":
        path = path.with_suffix(".onnx")
    blob = model.SerializeToString()
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": MULTITASK_SIDECAR_VERSION,
        "tasks": [{"task": h.task, "method": h.method, "classes": h.classes, "outputs": {"logits": h.task},
                   "n_features": int(len(h.features)), "taps_used": list(h.per_tap_indices())} for h in heads],
        "preprocess": first.layout["preprocess"],
        "input": "images",
        "backbone": first.backbone,
        "graph_sha256": _sha256(blob),
        "taps_used": summary.taps_used,
        "segments_kept": summary.segments_kept,
        "segments_total": summary.segments_total,
    }
    atomic_write_files({path: blob, path.with_suffix(".json"): _json_bytes(sidecar)})
    return MultiTaskCompileReport(path, path.stat().st_size, summary, time.perf_counter() - start, sidecar,
                                  tasks=[h.task for h in heads])


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


@dataclass
class SharedDeployReport:
    root: Path
    backbone_written: bool
    backbone_bytes: int
    heads: dict[str, int]  # task -> bytes of its two head files
    seconds: float


def package_shared_step(
    task_dirs: Sequence[str | Path], out_dir: str | Path, backbone_onnx: str | Path | None = None,
    weights: str | None = None,
) -> SharedDeployReport:
    """Write (or extend) a shared-backbone deployment: OUT/backbone.onnx + backbone.json once, and
    OUT/heads/TASK.safetensors + TASK.json per task.

    backbone_onnx: the exported backbone the tasks' features came from (checked by sha256). Without
    it the backbone is exported again with the tasks' layout (same taps, target size and weights).
    When OUT already holds a backbone, only the heads are written, after checking their layout.
    """
    start = time.perf_counter()
    heads = load_tasks(task_dirs)
    first = heads[0]
    root = Path(out_dir)
    backbone_json = root / "backbone.json"
    layout_hash = layout_sha256(first.layout)
    written = False
    if backbone_json.is_file():
        existing = read_json(backbone_json, "shared backbone sidecar")
        if existing.get("layout_sha256") != layout_hash:
            raise DeployError(
                f"{backbone_json} holds backbone {existing.get('backbone', {}).get('name')} with another feature "
                f"layout than task {first.task!r} was fitted on; deploy it to a new folder"
            )
    else:
        blob = _backbone_blob(first, backbone_onnx, weights)
        meta = {
            "format": BACKBONE_FORMAT,
            "version": 1,
            "preprocess": first.layout["preprocess"],
            "input": first.layout.get("input", "images"),
            "backbone": first.backbone,
            "layout": first.layout,
            "layout_sha256": layout_hash,
            "graph_sha256": _sha256(blob),
        }
        atomic_write_files({root / "backbone.onnx": blob, backbone_json: _json_bytes(meta)})
        written = True
    sizes = {}
    for head in heads:
        sizes[head.task] = _write_head(root / "heads", head, layout_hash)
    return SharedDeployReport(root, written, (root / "backbone.onnx").stat().st_size, sizes,
                              time.perf_counter() - start)


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _backbone_blob(head: TaskHead, backbone_onnx: str | Path | None, weights: str | None) -> bytes:
    if backbone_onnx is not None:
        blob = Path(backbone_onnx).read_bytes()
        if _sha256(blob) != head.backbone.get("onnx_sha256"):
            raise DeployError(
                f"{backbone_onnx} is not the backbone export task {head.task!r} was fitted on (sha256 differs from "
                "its task.json 'backbone.onnx_sha256'); pass the .onnx its features were extracted with"
            )
        return blob
    from exporters.backbones import load_backbone
    from exporters.export import export_backbone

    layout = head.layout
    bb = load_backbone(head.backbone["name"], weights=weights or _weights_source(head.backbone["weights"]))
    model, fresh = export_backbone(bb, int(layout["target_size"]), [t["name"] for t in layout["taps"]],
                                   cls_token=layout.get("cls_token", "pool"))
    if layout_sha256(fresh) != layout_sha256(layout):
        raise DeployError(f"re-exporting {head.backbone['name']} gives another feature layout than task {head.task!r} "
                          "was fitted on; pass the original export with --backbone")
    return model.SerializeToString()


def _write_head(heads_dir: Path, head: TaskHead, layout_hash: str) -> int:
    """heads/TASK.safetensors (features int64[k], weight float32[k, C], bias float32[C]) + heads/TASK.json."""
    from safetensors.numpy import save

    blob = save({
        "features": np.ascontiguousarray(head.features, dtype=np.int64),
        "weight": np.ascontiguousarray(head.weight, dtype=np.float32),
        "bias": np.ascontiguousarray(head.bias, dtype=np.float32),
    })
    meta = {
        "format": HEAD_FORMAT,
        "version": 1,
        "task": head.task,
        "method": head.method,
        "classes": head.classes,
        "n_features": int(len(head.features)),
        "layout_sha256": layout_hash,
        "backbone": head.backbone,
        "head_sha256": _sha256(blob),
    }
    weights_path, meta_path = heads_dir / f"{head.task}.safetensors", heads_dir / f"{head.task}.json"
    # The JSON vouches for the tensors (their sha256): it replaces its old version last.
    atomic_write_files({weights_path: blob, meta_path: _json_bytes(meta)})
    return weights_path.stat().st_size + meta_path.stat().st_size
