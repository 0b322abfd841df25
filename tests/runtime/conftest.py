"""Shared fixtures of the runtime tests: real photos on disk and a tiny hand-built task graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from tiny_task import TASK_CLASSES, TASK_PREPROCESS, TinyTaskGraph, build_task_graph, write_sidecar

from runtime.io import atomic_write_bytes


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory) -> dict[str, Path]:
    """Real photos plus odd modes and sizes, saved losslessly as PNG. Name -> path."""
    folder = tmp_path_factory.mktemp("photos")
    chelsea = data.chelsea()  # uint8[300, 451, 3]
    rgba = np.dstack([chelsea, np.linspace(0, 255, chelsea.shape[1], dtype=np.uint8)[None, :].repeat(300, 0)])
    rng = np.random.default_rng(0)
    images = {
        "chelsea": Image.fromarray(chelsea),
        "coffee": Image.fromarray(data.coffee()),
        "astronaut": Image.fromarray(data.astronaut()),
        "grayscale": Image.fromarray(data.camera()),  # mode L
        "rgba": Image.fromarray(rgba, mode="RGBA"),
        "small_nonsquare": Image.fromarray(rng.integers(0, 256, (19, 37, 3), dtype=np.uint8)),
        "palette": Image.fromarray(data.coffee()).convert("P"),
    }
    paths = {}
    for name, img in images.items():
        paths[name] = folder / f"{name}.png"
        img.save(paths[name])
    return paths


@pytest.fixture
def tiny_task(tmp_path) -> TinyTaskGraph:
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(3, len(TASK_CLASSES))).astype(np.float32) * 4
    bias = rng.normal(size=len(TASK_CLASSES)).astype(np.float32)
    path = tmp_path / "tiny.onnx"
    model = build_task_graph(weights, bias, TASK_PREPROCESS.height, TASK_PREPROCESS.width)
    atomic_write_bytes(path, model.SerializeToString())
    write_sidecar(path)
    return TinyTaskGraph(path=path, weights=weights, bias=bias)
