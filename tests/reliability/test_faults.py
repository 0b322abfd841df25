"""Faults mid-run: SIGKILL at chosen points of extract, fit and eval (subprocesses), then a rerun
resumes to exactly what an uninterrupted run writes; a write that fails part-way (a full disk)
keeps the previous artifact; a second writer of one cache is refused by its lock."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import runtime.io
from h2t_edge.core.artifacts import TaskHead
from h2t_edge.core.datasets import from_folder
from h2t_edge.core.errors import CacheError
from h2t_edge.steps.extract import FeatureCache, extract_features
from runtime.errors import ArtifactWriteError
from runtime.io import atomic_write_files
from runtime.predictor import Predictor

WORKER = Path(__file__).resolve().parent / "kill_worker.py"
CACHE_FILES = ("manifest.json", "features.npy", "labels.npy", "valid.npy", "digests.npy", "progress.npy")


def run_worker(step: str, args: dict, kill: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WORKER), step, json.dumps(args)] + ([kill] if kill else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if kill is None:
        assert result.returncode == 0 and "done" in result.stdout, result.stderr[-3000:]
    else:
        assert result.returncode == -signal.SIGKILL, f"{kill} did not kill: {result.stderr[-3000:]}"
    return result


def same_files(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


@pytest.fixture(scope="module")
def kill_images(tiny_root, tmp_path_factory):
    """The tiny image folder plus one truncated file (so a batch also rewrites the manifest)."""
    root = tmp_path_factory.mktemp("kill") / "images"
    shutil.copytree(tiny_root["images"], root)
    data = (root / "dark" / "000.png").read_bytes()
    (root / "dark" / "zz_truncated.png").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def reference_cache(tiny_root, kill_images, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ref") / "cache"
    run_worker("extract", {"onnx": str(tiny_root["backbone"]), "images": str(kill_images), "cache": str(cache),
                           "batch_size": 4})
    return cache


# Calls inside one extraction of 19 images in 5 batches: _save_npy #1 valid.npy, #2 digests.npy and
# #3 progress.npy at the start, then per batch valid.npy, digests.npy (the batch's sha256) and
# progress.npy (batch 2: #7, #8, #9); atomic_write_json #1 the first manifest, #2 the manifest listing
# the truncated image (batch 4), #3 the final one marking it complete (with the batch digests).
EXTRACT_KILLS = [
    "h2t_edge.steps.extract._save_npy:1:after",  # arrays created, no manifest yet
    "h2t_edge.steps.extract.atomic_write_json:1:during",  # first manifest half written
    "h2t_edge.steps.extract._save_npy:7:after",  # batch 2's features and valid flags in, digest not
    "h2t_edge.steps.extract._save_npy:8:after",  # batch 2's digest in, progress not
    "h2t_edge.steps.extract._save_npy:9:during",  # batch 2's progress record half written
    "h2t_edge.steps.extract.atomic_write_json:2:before",  # batch 4 (a skipped image) written, manifest not
    "h2t_edge.steps.extract.atomic_write_json:3:before",  # every batch done, not yet marked complete
]


@pytest.mark.slow
@pytest.mark.parametrize("kill", EXTRACT_KILLS)
def test_killed_extraction_resumes_bit_identical(tiny_root, kill_images, reference_cache, tmp_path, kill):
    args = {"onnx": str(tiny_root["backbone"]), "images": str(kill_images), "cache": str(tmp_path / "cache"),
            "batch_size": 4}
    run_worker("extract", args, kill)
    if (tmp_path / "cache" / "manifest.json").exists():
        with pytest.raises(CacheError):  # never mistaken for a complete cache
            FeatureCache.open(tmp_path / "cache")
    run_worker("extract", args)
    same_files(tmp_path / "cache", reference_cache, CACHE_FILES)
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def _task_json_without_timing(path: Path) -> dict:
    meta = json.loads(path.read_text())
    meta["report"].pop("fit_seconds")
    meta.pop("content_sha256")
    for row in meta["report"]["cv_table"]:
        row.pop("seconds", None)
    return meta


@pytest.fixture(scope="module")
def reference_fit(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("fitref") / "task"
    run_worker("fit", {"cache": str(tiny_root["cache"]), "out": str(out)})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill", [
    "h2t_edge.core.artifacts.atomic_write_files:1:before",  # HEAD2TOE fitted, not saved
    "h2t_edge.core.artifacts.atomic_write_files:1:after",  # HEAD2TOE saved, LINEAR not fitted
    "runtime.io._stage:4:during",  # LINEAR's task.json half written (its head staged)
])
def test_killed_fit_resumes(tiny_root, reference_fit, tmp_path, kill):
    args = {"cache": str(tiny_root["cache"]), "out": str(tmp_path / "task")}
    run_worker("fit", args, kill)
    saved = {m: (tmp_path / "task" / m / "task.json").read_bytes() for m in ("head2toe", "linear")
             if (tmp_path / "task" / m / "task.json").exists()}
    run_worker("fit", args)
    for method in ("head2toe", "linear"):
        got = tmp_path / "task" / method
        same_files(got, reference_fit / method, ["head.safetensors"])
        assert _task_json_without_timing(got / "task.json") == _task_json_without_timing(reference_fit / method / "task.json")
        TaskHead.load(got)
        if method in saved:  # a head saved before the kill is kept, not refitted
            assert (got / "task.json").read_bytes() == saved[method]
    assert not list((tmp_path / "task").rglob(".*.tmp"))


def _records_without_timing(path: Path) -> list[dict]:
    records = json.loads(path.read_text())["results"]
    for r in records:
        r.pop("fit_seconds")
        r.pop("date")  # when it was measured (h2t_edge.core.machine.measured_on)
        for run in r.get("per_target_size", []):
            run.pop("fit_seconds")
    return records


@pytest.mark.slow
def test_killed_eval_resumes(tmp_path):
    """Kill `run_eval` during extraction, after the LINEAR record, and between HEAD2TOE's two target
    sizes; each rerun continues, and the final records equal an uninterrupted evaluation's."""
    data = tmp_path / "data"
    ref = {"out": str(tmp_path / "ref" / "eval"), "work": str(tmp_path / "ref" / "work"), "data": str(data)}
    run_worker("eval", ref)
    args = {"out": str(tmp_path / "run" / "eval"), "work": str(tmp_path / "run" / "work"), "data": str(data)}
    for kill in ("h2t_edge.steps.extract._save_npy:5:after",  # inside the first extraction
                 "h2t_edge.suite.evaluate.atomic_write_json:1:after",  # LINEAR's record saved
                 "h2t_edge.steps.fit.atomic_write_json:1:after"):  # HEAD2TOE at T=12 kept, T=48 not fitted
        run_worker("eval", args, kill)
    fits = sorted((tmp_path / "run" / "work").rglob("fits/HEAD2TOE-*.json"))
    assert len(fits) == 1  # the T=12 fit survived the last kill ...
    kept = fits[0].read_bytes()
    run_worker("eval", args)
    assert fits[0].read_bytes() == kept  # ... and was reused, not refitted
    assert _records_without_timing(tmp_path / "run" / "eval.json") == _records_without_timing(tmp_path / "ref" / "eval.json")


# -- a write that fails part-way ---------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch):
    """Make the n-th artifact write (1-based) write half its bytes, then fail with ENOSPC."""
    def arm(n: int = 1):
        calls = {"n": 0}
        real = runtime.io._write_fully

        def write(file, data):
            calls["n"] += 1
            if calls["n"] == n:
                real(file, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            real(file, data)

        monkeypatch.setattr(runtime.io, "_write_fully", write)
    return arm


@pytest.mark.parametrize("failing", [1, 2])  # head.safetensors, task.json
def test_full_disk_keeps_the_previous_task_artifact(tiny_root, tmp_path, full_disk, failing):
    task = tmp_path / "head2toe"
    shutil.copytree(tiny_root["task"] / "head2toe", task)
    before = {p.name: p.read_bytes() for p in task.iterdir()}
    head = TaskHead.load(task)
    head.weight = head.weight * 2  # a different head that must not land half-way
    full_disk(failing)
    with pytest.raises(ArtifactWriteError, match="No space left.*unchanged") as info:
        head.save(task)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in task.iterdir()} == before  # no temp files either
    np.testing.assert_array_equal(TaskHead.load(task).weight, head.weight / 2)


def test_full_disk_keeps_the_previous_task_graph(tiny_graph, full_disk):
    """compile_step writes graph + sidecar with atomic_write_files: the sidecar failing keeps both."""
    graph, sidecar = tiny_graph.path, tiny_graph.path.with_suffix(".json")
    before = (graph.read_bytes(), sidecar.read_bytes())
    full_disk(2)
    with pytest.raises(ArtifactWriteError, match=str(sidecar)):
        atomic_write_files({graph: b"new graph", sidecar: b"{}"})
    assert (graph.read_bytes(), sidecar.read_bytes()) == before
    with Predictor.load(graph) as predictor:
        assert predictor.classes


def test_full_disk_during_extraction_leaves_a_resumable_cache(tiny_root, tmp_path, full_disk, monkeypatch):
    ds = from_folder(tiny_root["images"])
    full_disk(8)  # batch 2's valid.npy (valid, digests, progress and the manifest at the start, 3 per batch)
    with pytest.raises(ArtifactWriteError):
        extract_features(tiny_root["backbone"], ds, tmp_path / "cache", batch_size=4, dtype="float32")
    monkeypatch.undo()
    cache = extract_features(tiny_root["backbone"], ds, tmp_path / "cache", batch_size=4, dtype="float32")
    np.testing.assert_array_equal(cache.features, FeatureCache.open(tiny_root["cache"]).features)


# -- two writers ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_writer_of_a_cache_is_refused(tiny_root, kill_images, reference_cache, tmp_path):
    cache = tmp_path / "cache"
    ready = tmp_path / "ready"
    args = {"onnx": str(tiny_root["backbone"]), "images": str(kill_images), "cache": str(cache), "batch_size": 4,
            "ready": str(ready)}
    first = subprocess.Popen([sys.executable, str(WORKER), "extract", json.dumps(args), "pause:2"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first writer did not start"
            time.sleep(0.05)
        ds = from_folder(kill_images)
        with pytest.raises(CacheError, match=f"being written by pid {first.pid}.*{cache / '.lock'}"):
            extract_features(tiny_root["backbone"], ds, cache, batch_size=4, dtype="float32", on_error="skip")
        with pytest.raises(CacheError, match="being written"):  # --overwrite does not bypass it
            extract_features(tiny_root["backbone"], ds, cache, batch_size=4, dtype="float32", on_error="skip",
                             overwrite=True)
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the killed writer's lock: the cache resumes, identical to an uninterrupted run.
    extract_features(tiny_root["backbone"], from_folder(kill_images), cache, batch_size=4, dtype="float32",
                     on_error="skip")
    same_files(cache, reference_cache, CACHE_FILES)
