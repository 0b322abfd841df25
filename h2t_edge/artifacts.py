"""The task artifact: what `fit` produces and `compile` consumes. JSON + safetensors, no pickles.

A task directory holds:
- `head.safetensors`: `features` int64[k] (sorted indices into the layout's concatenated
  features), `weight` float32[k, C], `bias` float32[C], and `index/<tap>` int64 local indices;
- `task.json`: classes, method, target size, the full feature layout, preprocessing, backbone
  identity, the chosen hyperparameters, the CV tables and the sha256 of `head.safetensors`
  (written last, so a half-written pair is detected on load).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.io import atomic_write_bytes, atomic_write_json, read_json

from .errors import TaskArtifactError

TASK_FORMAT = "h2t-edge/task"


@dataclass
class TaskHead:
    """A fitted task: the selected features and the linear head on them."""

    task: str
    method: str
    classes: list[str]
    features: np.ndarray  # int64[k], sorted
    weight: np.ndarray  # float32[k, C]
    bias: np.ndarray  # float32[C]
    layout: dict
    backbone: dict  # name, weights, onnx_sha256
    config: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def per_tap_indices(self) -> dict[str, np.ndarray]:
        out = {}
        for tap in self.layout["taps"]:
            lo, hi = tap["offset"], tap["offset"] + tap["features"]
            inside = self.features[(self.features >= lo) & (self.features < hi)]
            if inside.size:
                out[tap["name"]] = inside - lo
        return out

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float32[n, D] (all layout features) -> float32[n, C]."""
        return np.asarray(features[:, self.features], dtype=np.float32) @ self.weight + self.bias

    def save(self, root: str | Path) -> Path:
        from safetensors.numpy import save

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        tensors = {
            "features": np.ascontiguousarray(self.features, dtype=np.int64),
            "weight": np.ascontiguousarray(self.weight, dtype=np.float32),
            "bias": np.ascontiguousarray(self.bias, dtype=np.float32),
        }
        tensors.update({f"index/{k}": v.astype(np.int64) for k, v in self.per_tap_indices().items()})
        blob = save(tensors)
        atomic_write_bytes(root / "head.safetensors", blob)
        atomic_write_json(root / "task.json", {
            "format": TASK_FORMAT,
            "version": 1,
            "task": self.task,
            "method": self.method,
            "classes": self.classes,
            "n_features": int(len(self.features)),
            "features_per_tap": {k: int(len(v)) for k, v in self.per_tap_indices().items()},
            "target_size": self.layout["target_size"],
            "preprocess": self.layout["preprocess"],
            "backbone": self.backbone,
            "config": self.config,
            "report": self.report,
            "layout": self.layout,
            "head_sha256": hashlib.sha256(blob).hexdigest(),
        })
        return root

    @classmethod
    def load(cls, root: str | Path) -> "TaskHead":
        from safetensors.numpy import load

        root = Path(root)
        meta = read_json(root / "task.json", "task artifact")
        if meta.get("format") != TASK_FORMAT or meta.get("version") != 1:
            raise TaskArtifactError(f"{root / 'task.json'} is not an h2t-edge task artifact (version 1)")
        head_path = root / "head.safetensors"
        try:
            blob = head_path.read_bytes()
        except OSError as exc:
            raise TaskArtifactError(f"cannot read {head_path}: {exc}; fit the task again") from exc
        if hashlib.sha256(blob).hexdigest() != meta["head_sha256"]:
            raise TaskArtifactError(
                f"{head_path} does not match {root / 'task.json'} (interrupted or mixed write); fit the task again"
            )
        t = load(blob)
        head = cls(
            task=meta["task"], method=meta["method"], classes=list(meta["classes"]),
            features=t["features"], weight=t["weight"], bias=t["bias"], layout=meta["layout"],
            backbone=meta["backbone"], config=meta.get("config", {}), report=meta.get("report", {}),
        )
        if head.weight.shape != (len(head.features), len(head.classes)):
            raise TaskArtifactError(f"{head_path}: weight shape {head.weight.shape} does not match the classes")
        return head
