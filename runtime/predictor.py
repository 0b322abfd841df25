"""`Predictor`: classify images with a compiled per-task ONNX graph and its JSON sidecar.

Layout (written by the task compiler): `TASK.onnx` and `TASK.json` side by side. The graph
maps `images: float32[batch, 3, H, W]` (preprocessed as the sidecar's "preprocess" says) to
`probabilities` and `logits`, both float32[batch, C], C = len(sidecar "classes").
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from .backends import create_runner
from .backends.base import Runner
from .errors import ArtifactError, ImageError
from .io import read_json
from .preprocess import PreprocessConfig, load_image, preprocess_image

SIDECAR_FORMAT = "h2t-edge/task-graph"
SIDECAR_VERSION = 1


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """The JSON sidecar of a task graph: same folder, same stem, '.json'."""
    return Path(onnx_path).with_suffix(".json")


@dataclass(frozen=True)
class TaskSidecar:
    """The contents of `TASK.json`. `extra` keeps any further keys, so a round trip through
    `from_dict` / `to_dict` loses nothing."""

    task: str
    classes: tuple[str, ...]
    preprocess: PreprocessConfig
    backbone: Mapping[str, Any]
    input: str = "images"
    outputs: Mapping[str, str] = field(
        default_factory=lambda: {"probabilities": "probabilities", "logits": "logits"}
    )
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "task": self.task,
            "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(),
            "input": self.input,
            "outputs": dict(self.outputs),
            "backbone": dict(self.backbone),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "TaskSidecar":
        """Parse and validate; `source` (the sidecar path) names the file in errors."""
        fix = "re-compile the task to regenerate it"

        def bad(key: str, why: str) -> ArtifactError:
            return ArtifactError(f"task sidecar {source}: field '{key}' {why}; {fix}")

        if not isinstance(d, dict):
            raise ArtifactError(f"task sidecar {source} must hold a JSON object; {fix}")
        if d.get("format") != SIDECAR_FORMAT:
            raise bad("format", f"is {d.get('format')!r}, expected {SIDECAR_FORMAT!r}")
        if d.get("version") != SIDECAR_VERSION:
            raise ArtifactError(
                f"task sidecar {source}: field 'version' is {d.get('version')!r}, this runtime reads "
                f"version {SIDECAR_VERSION}; re-compile the task with a matching h2t-edge"
            )
        for key in ("task", "input"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise bad(key, "must be a non-empty string")
        classes = d.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise bad("classes", "must be a non-empty list of strings")
        outputs = d.get("outputs")
        if not isinstance(outputs, dict) or not all(
            isinstance(outputs.get(k), str) for k in ("probabilities", "logits")
        ):
            raise bad("outputs", "must map 'probabilities' and 'logits' to output names")
        backbone = d.get("backbone")
        if not isinstance(backbone, dict) or not isinstance(backbone.get("name"), str):
            raise bad("backbone", "must be an object with a 'name'")
        if "preprocess" not in d:
            raise bad("preprocess", "is missing")
        known = {"format", "version", "task", "classes", "preprocess", "input", "outputs", "backbone"}
        return cls(
            task=d["task"],
            classes=tuple(classes),
            preprocess=PreprocessConfig.from_dict(d["preprocess"], source=f"task sidecar {source}"),
            backbone=backbone,
            input=d["input"],
            outputs=outputs,
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass
class Prediction:
    """The result for one image. On a skipped image `error` says why, `label` is '',
    `index` is -1 and `probability` is 0.0."""

    path: str
    label: str
    index: int
    probability: float
    probabilities: np.ndarray | None = None  # float32[C], in sidecar class order
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the full probability vector)."""
        return {
            "path": self.path,
            "label": self.label,
            "index": self.index,
            "probability": self.probability,
            "error": self.error,
        }


class Predictor:
    """Runs a compiled task graph on images. Build with `Predictor.load(path)`; close with
    `close()` or use as a context manager."""

    def __init__(self, runner: Runner, sidecar: TaskSidecar, path: str | os.PathLike = "<task graph>"):
        self.sidecar = sidecar
        self.path = Path(path)
        self._runner = runner
        self._runner.activate()
        self._check_graph_matches_sidecar()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        providers: Union[str, Sequence[str]] = "auto",
        intra_op_threads: int | None = None,
        backend: str = "onnxruntime",
        **backend_options: Any,
    ) -> "Predictor":
        """Load `TASK.onnx` and its sidecar `TASK.json` with `backend` ('onnxruntime',
        'openvino' or 'tensorrt'; see `runtime.backends.create_runner`).

        providers applies to onnxruntime only; intra_op_threads to onnxruntime and openvino;
        backend_options go to the backend's loader as they are.
        Raises ArtifactError when either file is missing or malformed, and BackendUnavailable
        when the backend or an explicitly requested provider does not initialize.
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"task graph {path} does not exist; pass the .onnx written by the compiler")
        sidecar_file = sidecar_path(path)
        if not sidecar_file.is_file():
            raise ArtifactError(
                f"task sidecar {sidecar_file} is missing; it must sit next to {path.name} with the "
                "same stem. Copy it along with the graph or re-compile the task"
            )
        sidecar = TaskSidecar.from_dict(read_json(sidecar_file, "task sidecar"), source=str(sidecar_file))
        if backend == "onnxruntime":
            backend_options = {"providers": providers, "intra_op_threads": intra_op_threads, **backend_options}
        elif backend == "openvino" and intra_op_threads is not None:
            backend_options.setdefault("num_threads", intra_op_threads)
        runner = create_runner(path, backend, **backend_options)
        return cls(runner, sidecar, path)

    # -- properties -------------------------------------------------------------------------

    @property
    def classes(self) -> tuple[str, ...]:
        return self.sidecar.classes

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.sidecar.preprocess

    @property
    def runner(self) -> Runner:
        return self._runner

    @property
    def backend(self) -> str:
        """Which backend runs the graph, e.g. 'onnxruntime[CPUExecutionProvider]'."""
        return self._runner.name

    # -- inference --------------------------------------------------------------------------

    def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images: float32[n, 3, H, W], already preprocessed.
        Returns (probabilities float32[n, C], logits float32[n, C])."""
        outputs = self._runner.infer({self.sidecar.input: images})
        names = self.sidecar.outputs
        probabilities, logits = outputs[names["probabilities"]], outputs[names["logits"]]
        if probabilities.shape[-1] != len(self.classes):
            raise ArtifactError(
                f"task graph {self.path} outputs {probabilities.shape[-1]} classes but its sidecar "
                f"lists {len(self.classes)} in 'classes'; re-compile the task"
            )
        return probabilities, logits

    def predict_paths(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 32,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> list[Prediction]:
        """Classify image files, `batch_size` at a time; results come in input order.

        on_error='raise' raises ImageError at the first bad file; 'skip' returns it as a
        Prediction with `error` set and carries on.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        results: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            results.extend(self._predict_chunk([str(p) for p in paths[start:start + batch_size]], on_error))
        return results

    def _predict_chunk(self, paths: list[str], on_error: str) -> list[Prediction]:
        by_position: dict[int, Prediction] = {}
        arrays, positions = [], []
        for i, path in enumerate(paths):
            try:
                arrays.append(preprocess_image(load_image(path), self.preprocess))
                positions.append(i)
            except ImageError as exc:
                if on_error == "raise":
                    raise
                by_position[i] = Prediction(path=path, label="", index=-1, probability=0.0, error=str(exc))
        if arrays:
            probabilities, _ = self.predict_arrays(np.stack(arrays))
            for i, probs in zip(positions, probabilities):
                best = int(np.argmax(probs))
                by_position[i] = Prediction(
                    path=paths[i],
                    label=self.classes[best],
                    index=best,
                    probability=float(probs[best]),
                    probabilities=probs,
                )
        return [by_position[i] for i in range(len(paths))]

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._runner.deactivate()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _check_graph_matches_sidecar(self) -> None:
        """Catch a sidecar from another compile before it gives wrong labels."""
        where = f"task graph {self.path} and its sidecar"
        if self.sidecar.input not in self._runner.input_names:
            raise ArtifactError(
                f"{where} disagree: sidecar 'input' is {self.sidecar.input!r}, graph inputs are "
                f"{self._runner.input_names}; re-compile the task"
            )
        missing = [n for n in self.sidecar.outputs.values() if n not in self._runner.output_names]
        if missing:
            raise ArtifactError(
                f"{where} disagree: sidecar 'outputs' names {missing}, graph outputs are "
                f"{self._runner.output_names}; re-compile the task"
            )
        shape = self._runner.input_shapes()[self.sidecar.input]
        expected = list(self.preprocess.input_size)
        if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected)):
            raise ArtifactError(
                f"{where} disagree: graph input shape is {shape}, sidecar 'preprocess.input_size' "
                f"is {expected}; re-compile the task"
            )
