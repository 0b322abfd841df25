"""Deploy several tasks on one backbone as a shared-backbone folder (`h2t-edge deploy`).

(The other form, one multi-task graph, is `h2t_edge.steps.compile.compile_tasks_step`.)

- `package_shared_step`: the backbone once (`backbone.onnx`: the graph the features were extracted
  with, pruned to the taps its heads read, so the device pools nothing it does not use) and a tiny
  head per task (`heads/TASK.safetensors` + `heads/TASK.json`); `runtime.heads.
  SharedBackbonePredictor` composes them with numpy. Adding a task to a device is copying its two
  head files (`h2t-edge deploy NEW_TASK -o DIR` writes only those when DIR has the backbone
  already); a head that reads a tap the device graph lacks is refused: train it with
  `--taps-from DIR` (`device_taps`), or deploy to a new folder.

Tasks can share a graph only when they were fitted on features of the same exported backbone
(same sha256 and layout); anything else is refused with an error naming both tasks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from h2t_edge.core.artifacts import TaskHead
from h2t_edge.steps.compile import DeployError, load_backbone_of, load_tasks
from runtime.errors import ArtifactError
from runtime.heads import (
    BACKBONE_FORMAT,
    HEAD_FORMAT,
    HEADS_MANIFEST,
    SHARED_VERSION,
    heads_manifest,
    layout_sha256,
    read_heads_manifest,
)
from runtime.io import atomic_write_files, json_bytes, read_json
from runtime.schema import is_name
from runtime.trust import SigningKey, file_digest, read_file, seal, verify_bytes, verify_seal


@dataclass
class SharedDeployReport:
    root: Path
    backbone_written: bool
    backbone_bytes: int
    heads: dict[str, int]  # task -> bytes of its two head files
    seconds: float
    taps: list[str] = field(default_factory=list)  # the taps the device graph computes


@dataclass(frozen=True)
class DeviceTaps:
    """The taps a deployed graph computes, and the backbone export they come from."""

    source: Path
    taps: tuple[str, ...]
    backbone: dict  # the sidecar's backbone record (name, weights, onnx_sha256, ...)


def device_taps(path: str | Path) -> DeviceTaps:
    """The taps of a deployment: a `deploy` folder (its backbone.json), a compiled graph (.onnx and its
    sidecar: the taps it reads) or a `train` task folder (its model.onnx). Everything is checked as a
    device loads it (seals, graph hashes) first."""
    from runtime.predictor import read_task_sidecar

    path = Path(path)
    if path.is_dir() and (path / "backbone.json").is_file():
        meta_file = path / "backbone.json"
        meta = read_json(meta_file, "shared backbone sidecar")
        try:
            verify_seal(meta, f"shared backbone sidecar {meta_file}", fix="write the folder again with `h2t-edge deploy`")
        except ArtifactError as exc:
            raise DeployError(str(exc)) from exc
        taps = meta.get("taps") or [t["name"] for t in meta["layout"]["taps"]]  # unpruned folders: every tap
        return DeviceTaps(path, tuple(taps), dict(meta["backbone"]))
    graph = path / "model.onnx" if path.is_dir() else path
    if graph.suffix != ".onnx" or not graph.is_file():
        raise DeployError(f"{path} is neither a `deploy` folder (backbone.json), a compiled graph (.onnx + .json) "
                          "nor a `train` task folder (model.onnx); pass one of those to --taps-from")
    try:
        sidecar = read_task_sidecar(graph)
    except ArtifactError as exc:
        raise DeployError(str(exc)) from exc
    taps = sidecar.extra.get("taps_used")
    if not taps:
        raise DeployError(f"the sidecar of {graph} does not record the taps the graph reads ('taps_used'); "
                          "re-compile it with this version of h2t-edge")
    return DeviceTaps(graph, tuple(taps), dict(sidecar.backbone))


def prune_to_taps(blob: bytes, taps: Sequence[str]) -> bytes:
    """The extraction graph `blob` with only the tap outputs `taps` (and the nodes they need): onnx's
    own subgraph extraction, which also drops the backbone past the deepest tap."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load_from_string(blob)
    names = [o.name for o in model.graph.output]
    keep = set(taps)
    missing = sorted(keep - set(names))
    if missing:
        raise DeployError(f"the backbone graph has no output for taps {missing[:5]}; it is another export")
    wanted = [n for n in names if n in keep]
    pruned = Extractor(model).extract_model([i.name for i in model.graph.input], wanted)
    for prop in model.metadata_props:  # the layout travels in the metadata
        pruned.metadata_props.add(key=prop.key, value=prop.value)
    pruned.ir_version, pruned.producer_name = model.ir_version, model.producer_name
    del pruned.opset_import[:]
    pruned.opset_import.extend(model.opset_import)
    return pruned.SerializeToString()


def package_shared_step(
    task_dirs: Sequence[str | Path], out_dir: str | Path, backbone_onnx: str | Path | None = None,
    weights: str | None = None, signing_key: SigningKey | None = None,
) -> SharedDeployReport:
    """Write (or extend) a shared-backbone deployment: OUT/backbone.onnx + backbone.json once, and
    OUT/heads/TASK.safetensors + TASK.json per task. Every JSON is sealed (runtime.trust) and, with
    `signing_key`, signed on its own, so a device can take heads one at a time and check each.

    backbone_onnx: the exported backbone the tasks' features came from (checked by sha256). Without
    it the backbone is exported again with the tasks' layout (same taps, target size and weights).
    When OUT already holds a backbone, only the heads are written, after checking their layout.
    """
    start = time.perf_counter()
    heads = load_tasks(task_dirs)
    for head in heads:  # names become file names under OUT: one rule, checked before any path is built
        if not is_name(head.task):
            raise DeployError(f"task name {head.task!r} (field 'task' of the task.json of {head.task!r}) is not a "
                              "valid name (letters, digits, '_', '.', '-'; a name is never a path); fit it again "
                              "with another name")
    first = heads[0]
    root = Path(out_dir)
    backbone_json = root / "backbone.json"
    layout_hash = layout_sha256(first.layout)
    written = False
    if backbone_json.is_file():
        existing = read_json(backbone_json, "shared backbone sidecar")
        try:
            verify_seal(existing, f"shared backbone sidecar {backbone_json}", fix="deploy to a new folder")
        except ArtifactError as exc:
            raise DeployError(str(exc)) from exc
        if existing.get("layout_sha256") != layout_hash:
            raise DeployError(
                f"{backbone_json} holds backbone {existing.get('backbone', {}).get('name')} with another feature "
                f"layout than task {first.task!r} was fitted on; deploy it to a new folder"
            )
        listed = _listed_heads(root)
        computed = existing.get("taps") or [t["name"] for t in existing["layout"]["taps"]]
        for head in heads:
            extra = sorted(set(head.per_tap_indices()) - set(computed))
            if extra:
                raise DeployError(
                    f"task {head.task!r} reads taps {extra[:4]}{' ...' if len(extra) > 4 else ''} that the device graph "
                    f"{root / 'backbone.onnx'} does not compute ({len(computed)} taps); train it with "
                    f"`--taps-from {root}` to use only those, or deploy it to a new folder"
                )
    else:
        read = {tap for head in heads for tap in head.per_tap_indices()}
        computed = [t.name for t in first.layout.taps if t.name in read]  # in layout order
        outputs = [t.output for t in first.layout.taps if t.name in read]
        blob = prune_to_taps(_backbone_blob(first, backbone_onnx, weights), outputs)
        meta = {
            "format": BACKBONE_FORMAT,
            "version": SHARED_VERSION,
            "preprocess": first.layout.preprocess,
            "input": first.layout.input,
            "backbone": first.backbone,
            "layout": first.layout,
            "layout_sha256": layout_hash,
            "graph_blake3": file_digest(blob),
            "taps": computed,  # the graph's outputs: the taps its heads read
        }
        atomic_write_files({root / "backbone.onnx": blob, backbone_json: json_bytes(seal(meta, signing_key))})
        written = True
        listed = {}
    sizes, files = {}, {}
    for head in heads:
        tensors, meta_bytes = _head_files(head, layout_hash, signing_key)
        files |= {root / "heads" / f"{head.task}.safetensors": tensors, root / "heads" / f"{head.task}.json": meta_bytes}
        listed[head.task] = meta_bytes
        sizes[head.task] = len(tensors) + len(meta_bytes)
    # heads.json lists every head (and vouches for their JSON): it is re-signed and replaces its old
    # version last, after the head files.
    files[root / HEADS_MANIFEST] = json_bytes(seal(heads_manifest(listed), signing_key))
    atomic_write_files(files)
    return SharedDeployReport(root, written, (root / "backbone.onnx").stat().st_size, sizes,
                              time.perf_counter() - start, list(computed))


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _listed_heads(root: Path) -> dict[str, bytes]:
    """Task -> the bytes of heads/TASK.json of every head an existing deployment lists (checked against
    its heads.json first), to list again beside the new heads."""
    try:
        listed = read_heads_manifest(root)
    except ArtifactError as exc:
        raise DeployError(str(exc)) from exc
    fix = "deploy to a new folder"
    try:
        return {task: verify_bytes(read_file(root / "heads" / f"{task}.json", what="task head", fix=fix), digest,
                                   field=f"heads.{task}", path=root / "heads" / f"{task}.json",
                                   descriptor=root / HEADS_MANIFEST, fix=fix, what="task head", algorithm="blake3")
                for task, digest in listed.items()}
    except ArtifactError as exc:
        raise DeployError(str(exc)) from exc


def _backbone_blob(head: TaskHead, backbone_onnx: str | Path | None, weights: str | None) -> bytes:
    record = head.backbone.get("precision")
    if record is not None:  # its features came from a graph at a precision, not from this export
        raise DeployError(f"task {head.task!r} was fitted on {record['precision']} features computed by "
                          f"{record['backend']}; a shared-backbone folder ships the fp32 export. Compile its tasks into "
                          "one multi-task graph instead, cut from the graph they were fitted on: "
                          "`h2t-edge compile TASK_DIR... -o tasks.onnx`")
    if backbone_onnx is not None:
        blob = Path(backbone_onnx).read_bytes()
        if _sha256(blob) != head.backbone.get("onnx_sha256"):
            raise DeployError(
                f"{backbone_onnx} is not the backbone export task {head.task!r} was fitted on (sha256 differs from "
                "its task.json 'backbone.onnx_sha256'); pass the .onnx its features were extracted with"
            )
        return blob
    from exporters.export import export_backbone

    layout = head.layout
    bb = load_backbone_of(head.backbone, weights)
    model, fresh = export_backbone(bb, layout.target_size, layout.tap_names,
                                   cls_token=layout.cls_token)
    if layout_sha256(fresh) != layout_sha256(layout):
        raise DeployError(f"re-exporting {head.backbone['name']} gives another feature layout than task {head.task!r} "
                          "was fitted on; pass the original export with --backbone")
    return model.SerializeToString()


def _head_files(head: TaskHead, layout_hash: str, signing_key: SigningKey | None = None) -> tuple[bytes, bytes]:
    """The bytes of heads/TASK.safetensors (features int64[k], weight float32[k, C], bias float32[C]) and
    of heads/TASK.json (sealed, signed with `signing_key`)."""
    from safetensors.numpy import save

    blob = save({
        "features": np.ascontiguousarray(head.features, dtype=np.int64),
        "weight": np.ascontiguousarray(head.weight, dtype=np.float32),
        "bias": np.ascontiguousarray(head.bias, dtype=np.float32),
    })
    meta = {
        "format": HEAD_FORMAT,
        "version": SHARED_VERSION,
        "task": head.task,
        "method": head.method,
        "classes": head.classes,
        "n_features": int(len(head.features)),
        "layout_sha256": layout_hash,
        "backbone": head.backbone,
        "head_blake3": file_digest(blob),
    }
    return blob, json_bytes(seal(meta, signing_key))
