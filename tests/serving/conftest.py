"""Fixtures of the serving tests: tiny task graphs (single- and multi-task) with their sidecars."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# The tiny task graph is shared with the runtime tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from tiny_task import TASK_CLASSES, TASK_PREPROCESS, build_task_graph, file_blake3, task_sidecar_dict, write_sidecar  # noqa: E402

from runtime.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from runtime.predictor import MULTITASK_SIDECAR_VERSION  # noqa: E402
from runtime.trust import seal  # noqa: E402


def write_task(folder: Path, name: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(3, len(TASK_CLASSES))).astype(np.float32) * 4
    bias = rng.normal(size=len(TASK_CLASSES)).astype(np.float32)
    path = folder / f"{name}.onnx"
    atomic_write_bytes(path, build_task_graph(weights, bias, TASK_PREPROCESS.height, TASK_PREPROCESS.width)
                       .SerializeToString())
    write_sidecar(path, name)
    return path


@pytest.fixture
def task_graphs(tmp_path) -> list[Path]:
    """Two tiny single-task graphs, 'tiny' and 'tiny2'."""
    return [write_task(tmp_path, "tiny", 1), write_task(tmp_path, "tiny2", 2)]


@pytest.fixture
def multi_task_graph(tmp_path) -> Path:
    """One graph with two heads, 'animals' (2 classes) and 'objects' (3 classes), and four outputs
    (probabilities and logits per task)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"], axis=1)]
    outputs, inits, tasks = [], [], []
    for head, classes in (("animals", ["cat", "dog"]), ("objects", ["cup", "rocket", "other"])):
        w = rng.normal(size=(3, len(classes))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{head}_W"))
        nodes += [helper.make_node("MatMul", ["features", f"{head}_W"], [f"{head}_logits"]),
                  helper.make_node("Softmax", [f"{head}_logits"], [f"{head}_probabilities"], axis=-1)]
        for kind in ("probabilities", "logits"):
            outputs.append(helper.make_tensor_value_info(f"{head}_{kind}", TensorProto.FLOAT, ["batch", len(classes)]))
        tasks.append({"task": head, "classes": classes,
                      "outputs": {"probabilities": f"{head}_probabilities", "logits": f"{head}_logits"}})
    graph = helper.make_graph(
        nodes, "two_heads",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path = tmp_path / "two_heads.onnx"
    atomic_write_bytes(path, model.SerializeToString())
    # The multi-task sidecar (version 4, sealed) that `h2t-edge compile A B ...` writes.
    single = task_sidecar_dict("two_heads")
    sidecar = seal({"format": single["format"], "version": MULTITASK_SIDECAR_VERSION, "tasks": tasks,
                    "preprocess": single["preprocess"], "input": "images", "backbone": single["backbone"],
                    "graph_blake3": file_blake3(path)})
    atomic_write_json(path.with_suffix(".json"), sidecar)
    return path


@pytest.fixture(scope="session")
def photo_paths(tmp_path_factory) -> list[Path]:
    """Real photos of odd sizes (scikit-image), saved as PNG."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("serving_photos")
    paths = []
    for name in ("chelsea", "coffee", "astronaut", "camera"):
        paths.append(root / f"{name}.png")
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(paths[-1])
    return paths
