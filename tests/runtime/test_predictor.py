"""Predictor on a tiny hand-built task graph, against a numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_task import TASK_CLASSES, TASK_PREPROCESS, build_task_graph, sealed_sidecar, task_sidecar_dict

from runtime.errors import ArtifactError, BackendUnavailable, ImageError
from runtime.predictor import Predictor, TaskSidecar, sidecar_path
from runtime.preprocess import preprocess_batch

PHOTOS = ["chelsea", "coffee", "astronaut", "grayscale", "rgba", "small_nonsquare"]


def test_predict_arrays_matches_numpy(tiny_task, photo_files):
    images = preprocess_batch([photo_files[name] for name in PHOTOS], TASK_PREPROCESS)
    with Predictor.load(tiny_task.path) as predictor:
        assert predictor.classes == tuple(TASK_CLASSES)
        assert predictor.backend == f"onnxruntime[{predictor.runner.provider}]"
        probabilities, logits = predictor.predict_arrays(images)
    expected_probabilities, expected_logits = tiny_task.reference(images)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=1e-5, atol=1e-6)


def test_predict_paths_batches_in_order(tiny_task, photo_files):
    paths = [photo_files[name] for name in PHOTOS]
    expected, _ = tiny_task.reference(preprocess_batch(paths, TASK_PREPROCESS))
    with Predictor.load(tiny_task.path, providers=["CPUExecutionProvider"]) as predictor:
        predictions = predictor.predict_paths(paths, batch_size=4)  # two batches, the last partial
    assert [p.path for p in predictions] == [str(p) for p in paths]
    for prediction, row in zip(predictions, expected):
        assert prediction.ok
        assert prediction.index == int(np.argmax(row))
        assert prediction.label == TASK_CLASSES[prediction.index]
        assert prediction.probability == pytest.approx(float(row.max()), rel=1e-5)
        np.testing.assert_allclose(prediction.probabilities, row, rtol=1e-5, atol=1e-6)


def test_predict_paths_skips_or_raises_on_corrupt_file(tiny_task, photo_files, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    paths = [photo_files["chelsea"], corrupt, photo_files["coffee"]]
    with Predictor.load(tiny_task.path) as predictor:
        with pytest.raises(ImageError, match="corrupt.jpg"):
            predictor.predict_paths(paths)
        predictions = predictor.predict_paths(paths, batch_size=2, on_error="skip")
        clean = predictor.predict_paths([photo_files["chelsea"], photo_files["coffee"]])
    assert [p.ok for p in predictions] == [True, False, True]
    skipped = predictions[1]
    assert skipped.label == "" and skipped.index == -1 and skipped.probabilities is None
    assert str(corrupt) in skipped.error
    assert [p.label for p in (predictions[0], predictions[2])] == [p.label for p in clean]
    json.dumps([p.to_dict() for p in predictions])  # JSON-friendly for the CLI


def test_explicit_unavailable_provider(tiny_task):
    with pytest.raises(BackendUnavailable, match="NoSuchExecutionProvider"):
        Predictor.load(tiny_task.path, providers=["NoSuchExecutionProvider"])


def _rewrite_sidecar(tiny_task, **changes):
    """A sidecar with `changes`, sealed as h2t-edge writes it: the check under test is the schema's."""
    path = sidecar_path(tiny_task.path)
    path.write_text(json.dumps(sealed_sidecar(tiny_task.path, **changes)))
    return path


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"format": "something-else"}, "'format'"),
        ({"version": 99}, "'version' is 99"),
        ({"classes": []}, "'classes'"),
        ({"classes": ["a", "b"]}, "2 in 'classes'"),
        ({"input": "pixels"}, "'input' is 'pixels'"),
        ({"outputs": {"probabilities": "probs", "logits": "logits"}}, r"\['probs'\]"),
        ({"preprocess": {**TASK_PREPROCESS.to_dict(), "input_size": [3, 64, 64]}}, "input_size"),
        ({"preprocess": {"mean": [0.5] * 3}}, "missing field"),
    ],
    ids=["format", "version", "no_classes", "class_count", "input", "outputs", "size", "preprocess"],
)
def test_bad_sidecar_raises_artifact_error_naming_it(tiny_task, photo_files, changes, match):
    sidecar = _rewrite_sidecar(tiny_task, **changes)
    with pytest.raises(ArtifactError, match=match) as info:
        with Predictor.load(tiny_task.path) as predictor:
            predictor.predict_paths([photo_files["chelsea"]])
    assert str(sidecar) in str(info.value) or str(tiny_task.path) in str(info.value)


def test_missing_files(tiny_task):
    sidecar = sidecar_path(tiny_task.path)
    sidecar.unlink()
    with pytest.raises(ArtifactError, match=f"{sidecar}.*missing"):
        Predictor.load(tiny_task.path)
    with pytest.raises(ArtifactError, match="other.onnx does not exist"):
        Predictor.load(tiny_task.path.with_name("other.onnx"))


def test_sidecar_round_trip_keeps_extra_keys():
    d = {**task_sidecar_dict(), "selection": {"num_features": 128}}
    assert TaskSidecar.from_dict(d, source="tiny.json").to_dict() == d


def test_graph_built_for_another_size_is_rejected(tmp_path):
    """A graph built for other input sizes is caught at load time, before any wrong output."""
    model = build_task_graph(np.zeros((3, 4), np.float32), np.zeros(4, np.float32), 48, 48)
    path = tmp_path / "task.onnx"
    path.write_bytes(model.SerializeToString())
    sidecar_path(path).write_text(json.dumps(sealed_sidecar(path)))
    with pytest.raises(ArtifactError, match=r"input_size"):
        Predictor.load(path)
