"""The task artifact: what `fit` produces and `compile` consumes. JSON + safetensors, no pickles.

A task directory holds:
- `head.safetensors`: `features` int64[k] (sorted indices into the layout's concatenated
  features), `weight` float32[k, C], `bias` float32[C], and `index/<tap>` int64 local indices;
- `task.json`: classes, method, target size, the full feature layout, preprocessing, backbone
  identity, the chosen hyperparameters, the CV tables, the sha256 of `head.safetensors` and
  `content_sha256`, the sha256 of task.json's own other fields (canonical JSON).

Both files are staged before either replaces an old one (`runtime.io.atomic_write_files`), so a
failed write keeps the previous artifact; task.json goes last, so a crash between the two renames
leaves a pair whose hashes disagree, which `load` refuses. `load` validates task.json against
`schemas.TASK`, checks both hashes, the tensors' names, dtypes, shapes and ranges, and refuses
NaN/inf weights, so an edited or damaged artifact is an error naming the file, never a head that
predicts. `save` refuses NaN/inf weights too: a non-finite head is never written.

A fine-tuned task (`FineTunedTask`, from `h2t-edge finetune`) is the other kind of task directory:
`task.json` (format `h2t-edge/finetuned-task`) + `tuned.safetensors` (the tuned block and the head).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from h2t_edge.core.errors import TaskArtifactError
from h2t_edge.core.layout import Layout
from h2t_edge.core.schemas import TASK
from runtime.errors import ArtifactError
from runtime.io import atomic_write_bytes, atomic_write_files, atomic_write_json, json_bytes, read_json
from runtime.schema import content_sha256, is_name, validate
from runtime.trust import seal, verify_seal

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
    layout: Layout  # the feature layout the head was fitted on (a dict; see core.layout)
    backbone: dict  # name, weights, onnx_sha256
    config: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layout = Layout.of(self.layout)  # a plain dict from a caller is typed here, once

    def per_tap_indices(self) -> dict[str, np.ndarray]:
        out = {}
        for tap in self.layout.taps:
            lo, hi = tap.offset, tap.offset + tap.features
            inside = self.features[(self.features >= lo) & (self.features < hi)]
            if inside.size:
                out[tap.name] = inside - lo
        return out

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float32[n, D] (all layout features) -> float32[n, C]."""
        return np.asarray(features[:, self.features], dtype=np.float32) @ self.weight + self.bias

    def save(self, root: str | Path) -> Path:
        from safetensors.numpy import save

        root = Path(root)
        if not (np.isfinite(self.weight).all() and np.isfinite(self.bias).all()):
            raise TaskArtifactError(f"the {self.method} head of task {self.task!r} has NaN/inf weights; it is not "
                                    f"written to {root}. Check the features (re-extract) and the learning rate")
        tensors = {
            "features": np.ascontiguousarray(self.features, dtype=np.int64),
            "weight": np.ascontiguousarray(self.weight, dtype=np.float32),
            "bias": np.ascontiguousarray(self.bias, dtype=np.float32),
        }
        tensors.update({f"index/{k}": v.astype(np.int64) for k, v in self.per_tap_indices().items()})
        blob = save(tensors)
        meta = {
            "format": TASK_FORMAT,
            "version": 1,
            "task": self.task,
            "method": self.method,
            "classes": self.classes,
            "n_features": int(len(self.features)),
            "features_per_tap": {k: int(len(v)) for k, v in self.per_tap_indices().items()},
            "target_size": self.layout.target_size,
            "preprocess": self.layout.preprocess,
            "backbone": self.backbone,
            "config": self.config,
            "report": self.report,
            "layout": self.layout,
            "head_sha256": hashlib.sha256(blob).hexdigest(),
        }
        meta["content_sha256"] = content_sha256(meta, "content_sha256")
        for name in ("head.safetensors", "task.json"):  # temporary files a killed earlier save left behind
            for stale in root.glob(f".{name}.*.tmp"):
                stale.unlink()
        atomic_write_files({root / "head.safetensors": blob, root / "task.json": json_bytes(meta)})
        return root

    @classmethod
    def load(cls, root: str | Path) -> "TaskHead":
        root = Path(root)
        meta_path, head_path = root / "task.json", root / "head.safetensors"
        fix = "fit the task again"
        meta = validate(read_json(meta_path, "task artifact"), TASK, what="task artifact", source=meta_path,
                        error=TaskArtifactError, fix=fix)
        if content_sha256(meta, "content_sha256") != meta["content_sha256"]:
            raise TaskArtifactError(f"{meta_path} was changed after it was written (its content does not match its "
                                    f"content_sha256); {fix}")
        try:
            blob = head_path.read_bytes()
        except OSError as exc:
            raise TaskArtifactError(f"cannot read {head_path}: {exc}; {fix}") from exc
        if hashlib.sha256(blob).hexdigest() != meta["head_sha256"]:
            raise TaskArtifactError(
                f"{head_path} does not match the head_sha256 in {meta_path} (changed, or an interrupted or mixed "
                f"write); {fix}"
            )
        t = _read_tensors(blob, head_path, meta)
        return cls(
            task=meta["task"], method=meta["method"], classes=list(meta["classes"]),
            features=t["features"], weight=t["weight"], bias=t["bias"], layout=Layout(meta["layout"]),
            backbone=meta["backbone"], config=meta["config"], report=meta["report"],
        )


def _read_tensors(blob: bytes, head_path: Path, meta: dict) -> dict[str, np.ndarray]:
    """The head's tensors, checked against task.json: features int64[k] sorted, unique and inside the
    layout; weight float32[k, C] and bias float32[C], finite."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    def bad(why: str) -> TaskArtifactError:
        return TaskArtifactError(f"{head_path}: {why}; fit the task again")

    try:
        t = load(blob)
    except (SafetensorError, ValueError, TypeError, KeyError, OverflowError) as exc:
        raise bad(f"not a readable safetensors file ({exc})") from None
    k, c, d = meta["n_features"], len(meta["classes"]), meta["layout"]["total_features"]
    expected = {"features": (np.int64, (k,)), "weight": (np.float32, (k, c)), "bias": (np.float32, (c,))}
    for name, (dtype, shape) in expected.items():
        if name not in t:
            raise bad(f"tensor {name!r} is missing")
        if t[name].dtype != dtype or t[name].shape != shape:
            raise bad(f"tensor {name!r} is {t[name].dtype}{list(t[name].shape)}, expected "
                      f"{np.dtype(dtype)}{list(shape)} (n_features={k}, {c} classes)")
    features = t["features"]
    if features.size and (features[0] < 0 or features[-1] >= d or np.any(np.diff(features) <= 0)):
        raise bad(f"tensor 'features' must be sorted, unique indices in [0, {d})")
    if not (np.isfinite(t["weight"]).all() and np.isfinite(t["bias"]).all()):
        raise bad("the head has NaN/inf weights")
    return t


# ----------------------------------------------------------------------------- fine-tuned tasks

FINETUNED_FORMAT = "h2t-edge/finetuned-task"
FINETUNED_VERSION = 2  # sealed (runtime.trust)


@dataclass
class FineTunedTask:
    """A fine-tuned task: the tuned block's weights and the linear head on its features."""

    task: str
    method: str  # 'LAYER-FT' | 'SCL-FT'
    layer: str
    classes: list[str]
    tuned: dict[str, np.ndarray]  # the block's state dict
    weight: np.ndarray  # float32[D_pre, C]
    bias: np.ndarray  # float32[C]
    backbone: dict  # name, weights (provenance), probe
    preprocess: dict
    config: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def save(self, root: str | os.PathLike) -> Path:
        from safetensors.numpy import save

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        tensors = {f"tuned/{k}": np.ascontiguousarray(v) for k, v in self.tuned.items()}
        tensors["head/weight"] = np.ascontiguousarray(self.weight, dtype=np.float32)
        tensors["head/bias"] = np.ascontiguousarray(self.bias, dtype=np.float32)
        blob = save(tensors)
        atomic_write_bytes(root / "tuned.safetensors", blob)
        # written last: a task.json always describes the weights next to it
        atomic_write_json(root / "task.json", seal({
            "format": FINETUNED_FORMAT, "version": FINETUNED_VERSION, "task": self.task, "method": self.method,
            "layer": self.layer, "classes": self.classes, "backbone": self.backbone, "preprocess": self.preprocess,
            "config": self.config, "report": self.report, "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }))
        return root

    @classmethod
    def load(cls, root: str | os.PathLike) -> "FineTunedTask":
        from safetensors.numpy import load

        root = Path(root)
        meta = read_json(root / "task.json", "fine-tuned task")
        if not isinstance(meta, dict) or meta.get("format") != FINETUNED_FORMAT or meta.get("version") != FINETUNED_VERSION:
            raise TaskArtifactError(f"{root / 'task.json'} is not an h2t-edge fine-tuned task (version "
                                    f"{FINETUNED_VERSION}; version 1 was not sealed); fine-tune it again with "
                                    "`h2t-edge finetune`")
        try:
            verify_seal(meta, root / "task.json", fix="fine-tune the task again")
        except ArtifactError as exc:
            raise TaskArtifactError(str(exc)) from None
        missing = [k for k in ("task", "method", "layer", "classes", "backbone", "preprocess", "weights_sha256")
                   if k not in meta]
        if missing:
            raise TaskArtifactError(f"{root / 'task.json'}: field {missing[0]!r} is missing; fine-tune again")
        if not is_name(meta["task"]):
            raise TaskArtifactError(f"{root / 'task.json'}: field 'task' is {str(meta['task'])[:80]!r}, not a valid task "
                                    "name (letters, digits, '_', '.', '-'; a name is never a path); fine-tune again")
        path = root / "tuned.safetensors"
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise TaskArtifactError(f"cannot read {path}: {exc}; fine-tune the task again") from exc
        if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
            raise TaskArtifactError(f"{path} does not match {root / 'task.json'} (interrupted or mixed write); "
                                    "fine-tune the task again")
        t = load(blob)
        task = cls(meta["task"], meta["method"], meta["layer"], list(meta["classes"]),
                   {k[len("tuned/"):]: v for k, v in t.items() if k.startswith("tuned/")},
                   t["head/weight"], t["head/bias"], meta["backbone"], meta["preprocess"],
                   meta.get("config", {}), meta.get("report", {}))
        if task.weight.ndim != 2 or task.weight.shape[1] != len(task.classes) or task.bias.shape != (len(task.classes),):
            raise TaskArtifactError(f"{path}: head shape {task.weight.shape} does not match the "
                                    f"{len(task.classes)} classes; fine-tune again")
        return task

    @property
    def task_bytes(self) -> int:
        """Bytes this task adds beside the shared backbone: tuned block (weights + statistics) + head."""
        return int(sum(v.nbytes for k, v in self.tuned.items() if not k.endswith("num_batches_tracked"))
                   + self.weight.nbytes + self.bias.nbytes)


def is_finetuned_task(task_dir: str | os.PathLike) -> bool:
    """True when TASK_DIR/task.json is a fine-tuned task (as opposed to a frozen-backbone head)."""
    try:
        meta = read_json(Path(task_dir) / "task.json", "task")
    except ArtifactError:  # missing or unreadable: the real loader names the problem
        return False
    return isinstance(meta, dict) and meta.get("format") == FINETUNED_FORMAT
