"""NaN and inf: in preprocessed images, in features (from the backbone, from float16 overflow or in
a damaged cache) and in weights. Each is a clear error at extraction, fit or load; a NaN head is
never written to disk and never predicts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny_backbone import write_backbone
from tiny_task import TASK_PREPROCESS, build_task_graph, write_sidecar

from h2t_edge.core.artifacts import TaskHead
from h2t_edge.core.errors import CacheError, TaskArtifactError
from h2t_edge.steps.extract import extract_features
from h2t_edge.pipeline import fit_step
from runtime.errors import ArtifactError, ImageError
from runtime.predictor import Predictor
from runtime.preprocess import PreprocessConfig


@pytest.mark.parametrize("field, value", [("mean", [0.5, float("nan"), 0.5]), ("std", [1.0, float("inf"), 1.0]),
                                          ("crop_pct", float("nan"))])
def test_non_finite_preprocessing_is_refused(field, value):
    config = {**TASK_PREPROCESS.to_dict(), field: value}
    with pytest.raises(ArtifactError, match=f"demo.json.*'{field}'"):
        PreprocessConfig.from_dict(config, source="demo.json")


def test_non_finite_images_are_refused_by_the_predictor(tiny_graph):
    images = np.zeros((2, *TASK_PREPROCESS.input_size), dtype=np.float32)
    images[1, 0, 3, 3] = np.nan
    with Predictor.load(tiny_graph.path) as predictor, pytest.raises(ImageError, match="NaN/inf"):
        predictor.predict_arrays(images)


def test_backbone_giving_nan_features_stops_extraction(tiny_root, tmp_path):
    onnx_path = write_backbone(tmp_path / "sqrt.onnx", 48, first="Sqrt")  # sqrt of negative pixels
    with pytest.raises(CacheError, match=f"NaN/inf features for images 0..3.*{onnx_path}"):
        extract_features(onnx_path, tiny_root["dataset"], tmp_path / "cache", batch_size=4)


def test_float16_overflow_is_refused_with_the_fix(tiny_root, tmp_path):
    onnx_path = write_backbone(tmp_path / "big.onnx", 48, scale=1e6)
    with pytest.raises(CacheError, match="overflow float16.*--dtype float32"):
        extract_features(onnx_path, tiny_root["dataset"], tmp_path / "f16", batch_size=4, dtype="float16")
    cache = extract_features(onnx_path, tiny_root["dataset"], tmp_path / "f32", batch_size=4, dtype="float32")
    assert np.isfinite(cache.features).all() and np.abs(cache.features).max() > 65504


def test_nan_features_in_a_cache_stop_the_fit_and_write_nothing(tiny_root, tmp_path):
    """NaN written into a cache after extraction (the writer refuses NaN) is caught as a change to
    its rows before any fit; `select` refuses NaN features on its own too (test_select)."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_root["cache"], cache)
    features = np.load(cache / "features.npy", mmap_mode="r+")
    features[5, 7] = np.nan
    features.flush()
    del features
    with pytest.raises(CacheError, match=f"{cache / 'features.npy'}: rows 4..7"):
        fit_step(cache, tmp_path / "task")
    assert not (tmp_path / "task").exists() or not list((tmp_path / "task").rglob("*.safetensors"))


def test_nan_head_is_never_written(tiny_root, tmp_path):
    task = tmp_path / "head2toe"
    shutil.copytree(tiny_root["task"] / "head2toe", task)
    before = {p.name: p.read_bytes() for p in task.iterdir()}
    head = TaskHead.load(task)
    head.weight[0, 0] = np.inf
    with pytest.raises(TaskArtifactError, match=f"NaN/inf weights; it is not written to {task}"):
        head.save(task)
    head.bias[:] = np.nan
    with pytest.raises(TaskArtifactError, match="NaN/inf weights"):
        head.save(tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in task.iterdir()} == before and not (tmp_path / "fresh").exists()


def test_nan_head_on_disk_is_refused_at_load(tiny_root, tmp_path):
    """A head whose weights became NaN on disk, with both hashes re-signed (a buggy writer)."""
    import hashlib

    from safetensors.numpy import load, save

    from runtime.schema import content_sha256

    task = tmp_path / "head2toe"
    shutil.copytree(tiny_root["task"] / "head2toe", task)
    tensors = load((task / "head.safetensors").read_bytes())
    tensors["weight"][2, 1] = np.nan
    blob = save(tensors)
    (task / "head.safetensors").write_bytes(blob)
    meta = json.loads((task / "task.json").read_text())
    meta["head_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["content_sha256"] = content_sha256(meta, "content_sha256")
    (task / "task.json").write_text(json.dumps(meta))
    with pytest.raises(TaskArtifactError, match=f"{task / 'head.safetensors'}: the head has NaN/inf weights"):
        TaskHead.load(task)


def test_graph_with_nan_weights_never_loads(tmp_path):
    weights = np.ones((3, 4), dtype=np.float32)
    weights[1, 2] = np.nan
    path = tmp_path / "nan.onnx"
    path.write_bytes(build_task_graph(weights, np.zeros(4, np.float32), 32, 32).SerializeToString())
    write_sidecar(path)
    with pytest.raises(ArtifactError, match=f"task graph {path} produced NaN/inf scores"):
        Predictor.load(path)
