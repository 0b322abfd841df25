"""Fixtures of the reliability tests: a tiny backbone, tiny image folders, a cache and a fitted task
built from them in well under a second, and the tiny task graph of the runtime tests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))  # tiny_task

from tiny_backbone import TINY_GRID, write_backbone, write_image_folder  # noqa: E402
from tiny_task import TASK_CLASSES, TASK_PREPROCESS, TinyTaskGraph, build_task_graph, write_sidecar  # noqa: E402

from runtime.io import atomic_write_bytes  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """{backbone: ONNX at T=48, backbone12: at T=12, images: class folders, cache: float32 cache,
    task: fitted task dir (head2toe/, linear/)} built once."""
    from h2t_edge.core.datasets import from_folder
    from h2t_edge.steps.extract import extract_features
    from h2t_edge.pipeline import fit_step

    root = tmp_path_factory.mktemp("tiny")
    out = {"backbone": write_backbone(root / "bb48.onnx", 48), "backbone12": write_backbone(root / "bb12.onnx", 12),
           "images": write_image_folder(root / "images")}
    out["dataset"] = from_folder(out["images"])
    extract_features(out["backbone"], out["dataset"], root / "cache", batch_size=4, dtype="float32")
    out["cache"] = root / "cache"
    fit_step(out["cache"], root / "task", grid=TINY_GRID)
    out["task"] = root / "task"
    return out


@pytest.fixture
def tiny_graph(tmp_path) -> TinyTaskGraph:
    """The runtime tests' tiny task graph (images -> mean colour -> linear head), with a sidecar that
    records the graph's sha256 as the compiler does."""
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(3, len(TASK_CLASSES))).astype(np.float32) * 4
    bias = rng.normal(size=len(TASK_CLASSES)).astype(np.float32)
    path = tmp_path / "tiny.onnx"
    atomic_write_bytes(path, build_task_graph(weights, bias, TASK_PREPROCESS.height,
                                              TASK_PREPROCESS.width).SerializeToString())
    write_sidecar(path)
    return TinyTaskGraph(path=path, weights=weights, bias=bias)
