"""`SharedBackbonePredictor`: many tasks on one shipped backbone, each task a tiny head file.

A deployment folder (written by `h2t-edge deploy`):

    backbone.onnx          the exported backbone with all taps: images -> one float32[batch, f_t]
                           output per tap, pooled and unit-normalised (the graph features came from)
    backbone.json          format "h2t-edge/shared-backbone" (version 2): preprocess, input, feature
                           layout, layout_sha256, graph_sha256; sealed (runtime.trust), maybe signed
    heads/TASK.safetensors features int64[k] (indices into the layout's concatenated features),
                           weight float32[k, C], bias float32[C]
    heads/TASK.json        format "h2t-edge/task-head" (version 2): task, classes, layout_sha256,
                           head_sha256; sealed, maybe signed, each on its own (heads arrive one by one)

The backbone runs once per batch; each head gathers its k features from the tap outputs and applies
its linear layer in numpy. A device adds a task by copying its two head files into heads/.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import create_runner
from .errors import ArtifactError
from .io import read_json
from .predictor import (
    MULTITASK_SIDECAR_VERSION,
    SIDECAR_FORMAT,
    Predictor,
    TaskOutputs,
    TaskSidecar,
    runner_options,
    softmax,
)
from .trust import ISSUED_FIELD, IntegrityError, TrustedKeys, VersionRecord, verify_file, verify_seal

BACKBONE_FORMAT = "h2t-edge/shared-backbone"
HEAD_FORMAT = "h2t-edge/task-head"
SHARED_VERSION = 2  # backbone.json and heads/TASK.json: sealed (runtime.trust); version 1 was not


def layout_sha256(layout: Mapping[str, Any]) -> str:
    """A fingerprint of a feature layout (canonical JSON), so heads and backbone can be matched."""
    return hashlib.sha256(json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class SharedHead:
    """One task's head on the shared backbone, split by tap for the gather.

    taps: (tap output name, int64[k_t] local indices) in layout order; weight float32[k, C] rows in
    the same order (k = sum of k_t); bias float32[C]."""

    task: str
    classes: tuple[str, ...]
    taps: tuple[tuple[str, np.ndarray], ...]
    weight: np.ndarray
    bias: np.ndarray

    def logits(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Tap outputs {name: float32[n, f_t]} -> float32[n, C]."""
        x = np.concatenate([outputs[name][:, idx] for name, idx in self.taps], axis=1)
        return x @ self.weight + self.bias


def load_head(meta_path: Path, layout: Mapping[str, Any], layout_hash: str, *,
              trusted: TrustedKeys | None = None, record: VersionRecord | None = None) -> SharedHead:
    """Read heads/TASK.json and its safetensors, checked: the seal (and signature, with trusted keys),
    the tensors' sha256, the file name against the signed task name, the backbone's layout and,
    with a version record, that it is not older than the head this device loaded before."""
    from safetensors.numpy import load

    meta = read_json(meta_path, "task head")
    fix = "copy the head again from `h2t-edge deploy`"
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT or meta.get("version") != SHARED_VERSION:
        raise IntegrityError(f"{meta_path} is not an h2t-edge task head (format {HEAD_FORMAT!r}, version "
                             f"{SHARED_VERSION}; version 1 heads were not sealed); deploy the task again")
    verify_seal(meta, f"task head {meta_path}", fix=fix, trusted=trusted)
    if meta.get("task") != meta_path.stem:
        raise IntegrityError(f"task head {meta_path} holds task {meta.get('task')!r}, not {meta_path.stem!r}: it was "
                             f"renamed or swapped in from another task; {fix}")
    if meta.get("layout_sha256") != layout_hash:
        raise ArtifactError(
            f"task head {meta_path}: field 'layout_sha256' does not match the backbone's in "
            f"{meta_path.parent.parent / 'backbone.json'}: the task was fitted on another backbone export; "
            "deploy it with its own backbone"
        )
    tensors_path = meta_path.with_suffix(".safetensors")
    try:
        blob = tensors_path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {tensors_path}: {exc}; {fix}") from exc
    if hashlib.sha256(blob).hexdigest() != meta.get("head_sha256"):
        raise IntegrityError(f"{tensors_path} does not match 'head_sha256' in {meta_path} (changed, or swapped in "
                             f"from another head); {fix}")
    if record is not None:
        record.check_and_update([meta_path.stem], meta.get(ISSUED_FIELD), meta_path)
    t = load(blob)
    features, weight, bias = t["features"].astype(np.int64), t["weight"], t["bias"]
    classes = meta.get("classes")
    if not isinstance(classes, list) or weight.shape != (len(features), len(classes)) or bias.shape != (len(classes),):
        raise ArtifactError(f"{tensors_path}: weight {weight.shape} / bias {bias.shape} do not match "
                            f"{len(features)} features and the classes in {meta_path}; {fix}")
    if features.size == 0 or np.any(np.diff(features) <= 0) or features[0] < 0 \
            or features[-1] >= layout["total_features"]:
        raise ArtifactError(f"{tensors_path}: 'features' must be sorted unique indices below "
                            f"{layout['total_features']}; {fix}")
    taps = []
    for tap in layout["taps"]:
        lo, hi = tap["offset"], tap["offset"] + tap["features"]
        inside = features[(features >= lo) & (features < hi)]
        if inside.size:
            taps.append((tap.get("output", tap["name"]), inside - lo))
    return SharedHead(str(meta["task"]), tuple(classes), tuple(taps), weight, bias)


class SharedBackbonePredictor(Predictor):
    """`Predictor` over a deployment folder: one backbone pass, then every head in numpy.
    `predict_tasks` / `predict_paths` behave as for a multi-task graph."""

    def __init__(self, runner, sidecar: TaskSidecar, heads: Sequence[SharedHead], path: str | os.PathLike):
        self.heads = list(heads)
        super().__init__(runner, sidecar, path)

    @classmethod
    def load(cls, path: str | os.PathLike, providers="auto", intra_op_threads: int | None = None,
             backend: str = "onnxruntime", tasks: Sequence[str] | None = None, *,
             trusted_keys: TrustedKeys | Sequence[str | os.PathLike] | None = None,
             version_record: VersionRecord | str | os.PathLike | None = None,
             **backend_options: Any) -> "SharedBackbonePredictor":
        """Load DIR/backbone.onnx and the heads in DIR/heads (all, or those named in `tasks`); each
        file is checked as `Predictor.load` checks a task graph (trusted_keys, version_record)."""
        root = Path(path)
        trusted = TrustedKeys.resolve(trusted_keys)
        record = VersionRecord.resolve(version_record)
        meta_file = root / "backbone.json"
        if not meta_file.is_file():
            raise ArtifactError(f"{root} is not a shared-backbone deployment: {meta_file.name} is missing; "
                                "write one with `h2t-edge deploy TASK_DIR ... -o DIR`")
        meta = read_json(meta_file, "shared backbone sidecar")
        fix = "write the folder again with `h2t-edge deploy`"
        if not isinstance(meta, dict) or meta.get("format") != BACKBONE_FORMAT or meta.get("version") != SHARED_VERSION:
            raise IntegrityError(f"{meta_file}: field 'format' must be {BACKBONE_FORMAT!r} (version {SHARED_VERSION}; "
                                 f"version 1 was not sealed); {fix}")
        verify_seal(meta, f"shared backbone sidecar {meta_file}", fix=fix, trusted=trusted)
        graph = root / "backbone.onnx"
        verify_file(graph, meta.get("graph_sha256"), field="graph_sha256", descriptor=meta_file, fix=fix,
                    what="backbone graph")
        layout = meta["layout"]
        if layout_sha256(layout) != meta.get("layout_sha256"):
            raise IntegrityError(f"{meta_file}: field 'layout_sha256' does not match its layout; {fix}")
        files = sorted((root / "heads").glob("*.json"))
        heads = [load_head(f, layout, meta["layout_sha256"], trusted=trusted, record=record) for f in files]
        if tasks is not None:
            missing = sorted(set(tasks) - {h.task for h in heads})
            if missing:
                raise ArtifactError(f"{root / 'heads'} has no head for {missing}; copy its head files there")
            heads = [h for h in heads if h.task in set(tasks)]
        if not heads:
            raise ArtifactError(f"{root / 'heads'} holds no task heads; add one with `h2t-edge deploy TASK_DIR -o {root}`")
        sidecar = TaskSidecar.from_dict({
            "format": SIDECAR_FORMAT, "version": MULTITASK_SIDECAR_VERSION, "input": meta["input"],
            "preprocess": meta["preprocess"], "backbone": meta["backbone"],
            "tasks": [{"task": h.task, "classes": list(h.classes), "outputs": {"logits": h.task}} for h in heads],
        }, source=str(meta_file))
        runner = create_runner(graph, backend, **runner_options(backend, providers, intra_op_threads, backend_options))
        return cls(runner, sidecar, heads, graph)

    def predict_tasks(self, images: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        outputs = self._infer(images)
        return self._scores({h.task: h.logits(outputs).astype(np.float32) for h in self.heads})

    def _check_graph_matches_sidecar(self) -> None:
        """Every tap a head reads must be an output of the backbone graph."""
        outputs = set(self._runner.output_names)
        for h in self.heads:
            missing = sorted({name for name, _ in h.taps} - outputs)
            if missing:
                raise ArtifactError(f"task head {h.task!r} reads taps {missing} that {self.path} does not output; "
                                    "deploy the task with its own backbone")
        # One probe inference, as for a task graph: class counts and finite scores show only in outputs.
        self.predict_tasks(np.zeros((1, *self.preprocess.input_size), dtype=np.float32))


__all__ = ["BACKBONE_FORMAT", "HEAD_FORMAT", "SHARED_VERSION", "SharedBackbonePredictor", "SharedHead", "TaskOutputs", "layout_sha256",
           "load_head", "softmax"]
