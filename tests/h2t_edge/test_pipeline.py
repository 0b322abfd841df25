"""Extract -> fit -> compile -> predict on a small generated task with the real backbone."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from h2t_edge.core.artifacts import TaskHead
from h2t_edge.cli import cli
from h2t_edge.core.datasets import from_manifest
from h2t_edge.core.errors import CacheError, TaskArtifactError
from h2t_edge.selection.path import PathSettings
from h2t_edge.steps.extract import FeatureCache, extract_features
from h2t_edge.pipeline import accuracy, check_same_backbone, fit_step
from h2t_edge.selection import SearchGrid
from h2t_edge.suite.tasks.dsprites import build_dsprites_task
from runtime.errors import ImageError
from runtime.predictor import Predictor
from runtime.preprocess import PreprocessConfig, preprocess_batch

TINY_GRID = SearchGrid(lrs=(0.1,), steps=(60,), l21s=(1e-3,), fractions=(0.01, 0.1), folds=2, batch_size=32)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_dsprites_task(tmp_path_factory.mktemp("dspr"), n_train=48, n_test=24, bins=4, seed=3)


@pytest.fixture(scope="module")
def caches(task, lite0_onnx, tmp_path_factory):
    path, _ = lite0_onnx
    root = tmp_path_factory.mktemp("features")
    return {split: extract_features(path, task[split], root / split, batch_size=16, dtype="float32")
            for split in ("train", "test")}


def test_cache_rows_equal_direct_onnx_run(caches, task, lite0_onnx):
    path, layout = lite0_onnx
    cache = caches["train"]
    assert cache.features.shape == (48, layout["total_features"])
    assert cache.manifest["complete"] and cache.valid.all()
    assert cache.labels.tolist() == task["train"].labels.tolist()
    cfg = PreprocessConfig.from_dict(layout["preprocess"])
    x = preprocess_batch(list(task["train"].paths[20:23]), cfg)
    direct = np.concatenate(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                            .run(None, {"images": x}), axis=1)
    np.testing.assert_allclose(cache.features[20:23], direct, atol=1e-5)


def test_interrupted_extraction_resumes_without_recomputing(caches, task, lite0_onnx, tmp_path):
    path, _ = lite0_onnx
    calls = []

    def stop_after_two_batches(done, total):
        calls.append(done)
        if done >= 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(path, task["train"], tmp_path / "c", batch_size=16, dtype="float32",
                         progress=stop_after_two_batches)
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache.open(tmp_path / "c")
    resumed = []
    cache = extract_features(path, task["train"], tmp_path / "c", batch_size=16, dtype="float32",
                             progress=lambda done, total: resumed.append(done))
    assert resumed == [32, 48]  # starts after the two finished batches
    np.testing.assert_array_equal(cache.features, caches["train"].features)


def test_cache_from_other_settings_is_not_reused(task, lite0_onnx, tmp_path):
    path, _ = lite0_onnx
    small = task["train"].subset(range(8))
    extract_features(path, small, tmp_path / "c", batch_size=8)
    with pytest.raises(CacheError, match="dtype"):
        extract_features(path, small, tmp_path / "c", batch_size=8, dtype="float32")
    other = task["train"].subset(range(8, 16))
    with pytest.raises(CacheError, match="--overwrite"):
        extract_features(path, other, tmp_path / "c", batch_size=8)
    cache = extract_features(path, other, tmp_path / "c", batch_size=8, overwrite=True)
    assert cache.features.dtype == np.float16 and list(cache.manifest["images"]) == list(other.paths)


def test_same_images_from_another_manifest_reuse_the_cache(task, lite0_onnx, tmp_path):
    """The cache is keyed by the images, labels and classes, not by where the manifest lies."""
    path, _ = lite0_onnx
    small = task["train"].subset(range(8))
    first = from_manifest(small.to_manifest(tmp_path / "a" / "train.jsonl"))
    second = from_manifest(small.to_manifest(tmp_path / "b" / "train.jsonl"))
    assert first.source != second.source and first.fingerprint() == second.fingerprint()
    cache = extract_features(path, first, tmp_path / "c", batch_size=8)
    written = (tmp_path / "c" / "features.npy").stat().st_mtime_ns
    calls = []
    again = extract_features(path, second, tmp_path / "c", batch_size=8, progress=lambda d, t: calls.append(d))
    assert calls == [] and (tmp_path / "c" / "features.npy").stat().st_mtime_ns == written  # nothing recomputed
    np.testing.assert_array_equal(again.features, cache.features)


def test_corrupt_image_is_named_or_skipped(task, lite0_onnx, tmp_path):
    path, _ = lite0_onnx
    paths = list(task["train"].paths[:6])
    bad = tmp_path / "broken.png"
    bad.write_bytes(open(paths[2], "rb").read()[:60])  # truncated PNG
    paths[2] = str(bad)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": p, "label": f"c{i % 2}"}) + "\n" for i, p in enumerate(paths)))
    ds = from_manifest(manifest)
    with pytest.raises(ImageError, match="broken.png"):
        extract_features(path, ds, tmp_path / "raise", batch_size=4)
    cache = extract_features(path, ds, tmp_path / "skip", batch_size=4, on_error="skip")
    assert cache.valid.tolist() == [True, True, False, True, True, True]
    assert [s["path"] for s in cache.manifest["skipped"]] == [str(bad)]
    assert not cache.features[2].any()
    assert cache.arrays()[0].shape[0] == 5


def test_fit_precision_is_recorded_and_a_changed_precision_refits(caches, tmp_path):
    """`fit --fit-precision bf16` trains with bf16 GEMMs, says so in task.json, and a rerun in
    fp32 does not reuse the bf16 heads."""
    out = tmp_path / "task"
    result = CliRunner().invoke(cli, ["fit", str(caches["train"].root), "--out", str(out), "--grid", "quick",
                                      "--method", "LINEAR", "--solver", "paper", "--fit-precision", "bf16", "-q"])
    assert result.exit_code == 0, result.output
    bf16 = TaskHead.load(out / "linear")
    assert bf16.config["grid"]["precision"] == "bf16"
    result = CliRunner().invoke(cli, ["fit", str(caches["train"].root), "--out", str(out), "--grid", "quick",
                                      "--method", "LINEAR", "-q"])
    assert result.exit_code == 0, result.output
    fp32 = TaskHead.load(out / "linear")
    assert fp32.config["grid"]["precision"] == "fp32"
    assert not np.array_equal(fp32.weight, bf16.weight)  # refitted, in the other precision
    np.testing.assert_allclose(fp32.weight, bf16.weight, atol=0.05 * np.abs(fp32.weight).max())


def test_fit_compile_predict_agree(caches, task, tmp_path):
    report = fit_step(caches["train"].root, tmp_path / "task", grid=TINY_GRID)
    assert set(report.heads) == {"HEAD2TOE", "LINEAR"}
    h2t = TaskHead.load(tmp_path / "task" / "head2toe")
    lin = TaskHead.load(tmp_path / "task" / "linear")
    pre = caches["train"].tap_columns("pre_logits")
    assert lin.features.min() >= pre.start and lin.features.max() < pre.stop and len(lin.features) == 1280
    assert len(h2t.features) in {max(1, int(f * h2t.layout["total_features"])) for f in TINY_GRID.fractions}
    # the path solver: one row per (CV path point, F), and per tap budget at one point (those F that fit in it)
    rows = report.cv["HEAD2TOE"]
    unbudgeted = [r for r in rows if r["taps"] is None]
    assert len(unbudgeted) == len(PathSettings().cv_points()) * len(TINY_GRID.fractions)
    assert {r["taps"] for r in rows} - {None} <= set(TINY_GRID.tap_budgets) and all("latency" in r for r in rows)

    graph = tmp_path / "graph.onnx"
    result = CliRunner().invoke(cli, ["compile", str(tmp_path / "task" / "head2toe"), "-o", str(graph)])
    assert result.exit_code == 0, result.output
    assert "backbone segments" in result.output and json.loads(graph.with_suffix(".json").read_text())["task"] == "task"
    predictor = Predictor.load(graph)
    test = caches["test"]
    cfg = PreprocessConfig.from_dict(h2t.layout["preprocess"])
    probabilities, logits = predictor.predict_arrays(preprocess_batch(list(task["test"].paths), cfg))
    np.testing.assert_allclose(logits, h2t.logits(test.features), atol=1e-4)
    predictions = predictor.predict_paths(list(task["test"].paths), batch_size=8)
    assert [p.index for p in predictions] == logits.argmax(1).tolist()
    assert [p.label for p in predictions] == [h2t.classes[i] for i in logits.argmax(1)]
    assert accuracy(h2t, test) == pytest.approx(np.mean(logits.argmax(1) == test.labels))

    # The CLI writes the same predictions as CSV and JSON.
    image_dir = str(task["test"].paths[0]).rsplit("/", 2)[0]  # .../test with class subfolders
    for fmt in ("csv", "json"):
        out = tmp_path / f"pred.{fmt}"
        result = CliRunner().invoke(cli, ["predict", str(graph), image_dir, "--format", fmt, "-o", str(out)])
        assert result.exit_code == 0, result.output
        text = out.read_text()
        rows = json.loads(text) if fmt == "json" else text.strip().splitlines()[1:]
        assert len(rows) == len(task["test"])
    by_path = {r["path"]: r["label"] for r in json.loads((tmp_path / "pred.json").read_text())}
    assert [by_path[p] for p in task["test"].paths] == [p.label for p in predictions]


def test_task_artifact_guards(caches, tmp_path):
    result = CliRunner().invoke(cli, ["fit", str(caches["train"].root), "--out", str(tmp_path / "t"),
                                      "--method", "LINEAR", "--grid", "quick", "-q"])
    assert result.exit_code == 0, result.output
    assert "LINEAR" in result.output and "CV accuracy" in result.output
    head = TaskHead.load(tmp_path / "t" / "linear")
    head.backbone = {**head.backbone, "onnx_sha256": "0" * 64}
    with pytest.raises(TaskArtifactError, match="another backbone"):
        check_same_backbone(head, caches["test"])
    blob = tmp_path / "t" / "linear" / "head.safetensors"
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(TaskArtifactError, match="fit the task again"):
        TaskHead.load(tmp_path / "t" / "linear")
