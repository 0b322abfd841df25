"""Tampering: a changed head, task.json, task graph, sidecar or engine is caught by its recorded
sha256 before use, with an error naming the file; a cache or head from another backbone, target
size, preprocessing or dtype is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tiny_backbone import tiny_layout, write_backbone
from tiny_task import file_blake3, task_sidecar_dict

from h2t_edge.core.artifacts import TaskHead
from h2t_edge.core.errors import CacheError, TaskArtifactError
from h2t_edge.steps.extract import FeatureCache, extract_features
from h2t_edge.pipeline import accuracy, fit_step
from runtime.backends.base import BatchProfile
from runtime.backends.tensorrt import EngineKey, check_engine_record, write_engine_record
from runtime.errors import ArtifactError
from runtime.io import file_sha256
from runtime.predictor import Predictor
from runtime.schema import content_sha256


@pytest.fixture
def task_dir(tiny_root, tmp_path):
    path = tmp_path / "head2toe"
    shutil.copytree(tiny_root["task"] / "head2toe", path)
    return path


def test_changed_cache_manifest_is_refused(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_root["cache"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][::-1]  # valid, and every label would be wrong
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=f"{cache / 'manifest.json'} was changed after it was written"):
        FeatureCache.open(cache)


def test_changed_head_is_refused(task_dir):
    blob = bytearray((task_dir / "head.safetensors").read_bytes())
    blob[-3] ^= 0x01  # one bit of one weight
    (task_dir / "head.safetensors").write_bytes(bytes(blob))
    with pytest.raises(TaskArtifactError, match=f"{task_dir / 'head.safetensors'} does not match the head_sha256"):
        TaskHead.load(task_dir)


@pytest.mark.parametrize("edit", ["swap_classes", "reorder_features", "other_backbone"])
def test_changed_task_json_is_refused(task_dir, edit):
    meta = json.loads((task_dir / "task.json").read_text())
    if edit == "swap_classes":  # valid JSON, valid schema, confidently wrong labels
        meta["classes"] = meta["classes"][::-1]
    elif edit == "reorder_features":
        meta["features_per_tap"] = dict(reversed(list(meta["features_per_tap"].items())))
        meta["n_features"] += 0
        meta["layout"]["taps"][0]["name"] = "renamed"
    else:
        meta["backbone"]["onnx_sha256"] = "1" * 64
    (task_dir / "task.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(TaskArtifactError, match=f"{task_dir / 'task.json'} was changed after it was written"):
        TaskHead.load(task_dir)


def _signed(sidecar: dict) -> dict:
    return {**sidecar, "content_sha256": content_sha256(sidecar, "content_sha256")}


def test_changed_task_graph_is_refused(tiny_graph):
    model = onnx.load(str(tiny_graph.path))
    weights = next(t for t in model.graph.initializer if t.name == "W")
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 1.01, "W"))
    tiny_graph.path.write_bytes(model.SerializeToString())
    with pytest.raises(ArtifactError, match=f"task graph {tiny_graph.path} does not match the graph_blake3"):
        Predictor.load(tiny_graph.path)


def test_changed_sidecar_is_refused(tiny_graph):
    sidecar = tiny_graph.path.with_suffix(".json")
    signed = _signed({**task_sidecar_dict(), "graph_blake3": file_blake3(tiny_graph.path)})
    sidecar.write_text(json.dumps(signed))
    with Predictor.load(tiny_graph.path) as predictor:  # signed and unchanged: loads
        assert predictor.classes == tuple(signed["classes"])
    sidecar.write_text(json.dumps({**signed, "classes": signed["classes"][::-1]}))
    with pytest.raises(ArtifactError, match=f"task sidecar {sidecar} was changed after it was written"):
        Predictor.load(tiny_graph.path)


def test_changed_engine_is_refused(tiny_graph, tmp_path):
    engine = tmp_path / "tiny.onnxruntime.fp16.onnx"
    shutil.copy(tiny_graph.path, engine)
    build = {"backend": "onnxruntime", "precision": "fp16", "artifact": engine.name,
             "artifact_blake3": file_blake3(engine)}
    engine.with_suffix(".json").write_text(json.dumps(_signed({**task_sidecar_dict(), "build": build})))
    Predictor.load(engine).close()
    model = onnx.load(str(engine))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(4, np.float32), model.graph.initializer[1].name))
    engine.write_bytes(model.SerializeToString())
    with pytest.raises(ArtifactError, match=f"engine {engine} does not match the build.artifact_blake3"):
        Predictor.load(engine)


def test_changed_tensorrt_engine_is_refused(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized engine")
    write_engine_record(engine, EngineKey("0" * 64, "10.0", "GPU", "fp16", BatchProfile.up_to(8)))
    check_engine_record(engine, "10.0", "GPU")
    engine.write_bytes(b"serialized engine, patched")
    with pytest.raises(ArtifactError, match=f"engine {engine} does not match the engine_blake3"):
        check_engine_record(engine, "10.0", "GPU")


# -- a cache or head from other settings ------------------------------------------------------


@pytest.mark.parametrize("change, field", [
    ("backbone", "backbone"),  # same layout, other weights (another sha256)
    ("target_size", "layout"),
    ("preprocessing", "layout"),
    ("dtype", "dtype"),
])
def test_cache_from_other_settings_is_refused(tiny_root, tmp_path, change, field):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_root["cache"], cache)
    onnx_path, dtype = tiny_root["backbone"], "float32"
    if change == "backbone":
        onnx_path = write_backbone(tmp_path / "other.onnx", 48, scale=2.0)
    elif change == "target_size":
        onnx_path = tiny_root["backbone12"]
    elif change == "preprocessing":
        layout = tiny_layout(48)
        layout["preprocess"]["mean"] = [0.4, 0.5, 0.5]
        onnx_path = write_backbone(tmp_path / "pre.onnx", 48, layout)
    else:
        dtype = "float16"
    with pytest.raises(CacheError, match=f"{cache} holds a feature cache with a different [a-z_, ]*{field}.*--overwrite"):
        extract_features(onnx_path, tiny_root["dataset"], cache, batch_size=4, dtype=dtype)
    FeatureCache.open(cache)  # untouched


def test_head_and_cache_of_other_target_sizes_do_not_mix(tiny_root, tmp_path):
    head = TaskHead.load(tiny_root["task"] / "head2toe")
    other = extract_features(tiny_root["backbone12"], tiny_root["dataset"], tmp_path / "c12", batch_size=4)
    with pytest.raises(TaskArtifactError, match="another backbone or layout"):
        accuracy(head, other)


def test_fit_resume_refits_when_the_cache_changed(tiny_root, tmp_path):
    """A resumed fit keeps a head only if it came from the same cache: after re-extracting (here as
    float16) the heads in OUT are refitted, not silently reused."""
    from tiny_backbone import TINY_GRID

    out = tmp_path / "task"
    fit_step(tiny_root["cache"], out, grid=TINY_GRID, methods=("LINEAR",))
    first = (out / "linear" / "task.json").read_bytes()
    assert fit_step(tiny_root["cache"], out, grid=TINY_GRID, methods=("LINEAR",)) and \
        (out / "linear" / "task.json").read_bytes() == first  # same cache: kept
    f16 = extract_features(tiny_root["backbone"], tiny_root["dataset"], tmp_path / "c16", batch_size=4)
    fit_step(f16.root, out, grid=TINY_GRID, methods=("LINEAR",))
    meta = json.loads((out / "linear" / "task.json").read_text())
    assert meta["report"]["cache_manifest_sha256"] == file_sha256(f16.root / "manifest.json")
