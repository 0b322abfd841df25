"""A tiny hand-built task graph (onnx.helper) with its sidecar, and its numpy reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.io import atomic_write_json
from runtime.predictor import SIDECAR_VERSION
from runtime.preprocess import PreprocessConfig
from runtime.trust import file_digest, seal

TASK_CLASSES = ["cat", "coffee", "astronaut", "other"]
# Small input so the tiny graph runs in milliseconds; bilinear exercises a second filter.
TASK_PREPROCESS = PreprocessConfig(
    input_size=(3, 32, 32),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bilinear",
    crop_pct=0.875,
)


@dataclass
class TinyTaskGraph:
    path: Path  # the .onnx; the sidecar sits next to it
    weights: np.ndarray  # float32[3, C]
    bias: np.ndarray  # float32[C]

    def reference(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """numpy version of the graph: images float32[n, 3, H, W] -> (probabilities, logits)."""
        logits = images.mean(axis=(2, 3)) @ self.weights + self.bias
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True), logits


def build_task_graph(weights: np.ndarray, bias: np.ndarray, height: int, width: int) -> onnx.ModelProto:
    """images -> GlobalAveragePool -> Flatten -> MatMul W -> Add b -> logits -> Softmax."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1, name="flatten"),
        helper.make_node("MatMul", ["features", "W"], ["scores"], name="head"),
        helper.make_node("Add", ["scores", "b"], ["logits"], name="bias"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1, name="softmax"),
    ]
    num_classes = weights.shape[1]
    graph = helper.make_graph(
        nodes,
        "tiny_task",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, height, width])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", num_classes]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]),
        ],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def task_sidecar_dict(task: str = "tiny") -> dict:
    """The sidecar's content, not yet sealed (see `write_sidecar`)."""
    return {
        "format": "h2t-edge/task-graph",
        "version": SIDECAR_VERSION,
        "task": task,
        "classes": TASK_CLASSES,
        "preprocess": TASK_PREPROCESS.to_dict(),
        "input": "images",
        "outputs": {"probabilities": "probabilities", "logits": "logits"},
        "backbone": {"name": "tiny-average", "onnx_sha256": "0" * 64},
    }


def sealed_sidecar(graph: Path, task: str = "tiny", signing_key=None, **changes) -> dict:
    """The sidecar of the tiny graph at `graph` as h2t-edge writes it: its graph_blake3, sealed
    (signed with `signing_key` when given). `changes` replace fields before sealing."""
    return seal({**task_sidecar_dict(task), "graph_blake3": file_blake3(graph), **changes}, signing_key)


def file_blake3(path: Path) -> str:
    """The BLAKE3 h2t-edge records for the file at `path`."""
    return file_digest(Path(path).read_bytes())


def write_sidecar(graph: Path, task: str = "tiny", signing_key=None, **changes) -> Path:
    """Write GRAPH.json: `sealed_sidecar(graph, ...)`."""
    return atomic_write_json(Path(graph).with_suffix(".json"), sealed_sidecar(Path(graph), task, signing_key, **changes))
