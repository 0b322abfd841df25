"""Property-based tests: every JSON artifact loader, fed damaged or adversarial input, either refuses
it with the project's typed error naming the file, or gives an artifact that is sound (its arrays
agree with it and its predictions are finite). Never another exception, never a hang."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from json_mutations import damaged, damaged_text
from tiny_backbone import tiny_layout, write_backbone
from tiny_task import file_blake3, task_sidecar_dict

from h2t_edge.core.artifacts import TaskHead
from h2t_edge.core.datasets import from_folder
from h2t_edge.core.errors import H2TEdgeError
from h2t_edge.steps.extract import FeatureCache, extract_features, read_layout
from runtime.backends.base import BatchProfile
from runtime.backends.tensorrt import EngineKey, check_engine_record, write_engine_record
from runtime.errors import H2TRuntimeError
from runtime.io import file_sha256
from runtime.predictor import Predictor
from runtime.schema import content_sha256

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)


# Hypothesis' own deadline is off (a loaded CI machine makes per-example timing flaky); instead each
# load gets a generous wall-clock bound, so a loader that hangs fails its test instead of stalling CI.
HANG_SECONDS = 30.0


class LoaderHang(AssertionError):
    """A loader ran past HANG_SECONDS on one input."""


@contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    """Raise LoaderHang in the main thread if the body runs longer than `seconds` (SIGALRM)."""
    def fire(signum, frame):
        raise LoaderHang(f"a loader ran over {seconds} s on one input")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused_or_sound(load, names: str, check, seconds: float = HANG_SECONDS):
    """Run `load()` (bounded by `seconds`); a typed error must name `names` (the file); a success must
    pass `check`."""
    try:
        with no_hang(seconds):
            result = load()
    except (H2TEdgeError, H2TRuntimeError) as exc:
        assert names in str(exc), f"error does not name {names}: {exc}"
        return None
    check(result)
    return result


def _assert_equal(got, expected) -> None:
    assert got == expected, f"a damaged record loaded as {got}, not the {expected} it was written with"


def test_a_hanging_loader_fails_instead_of_stalling():
    start = time.monotonic()
    with pytest.raises(LoaderHang, match="over 0.2 s"):
        refused_or_sound(lambda: time.sleep(10), "x", lambda result: None, seconds=0.2)
    assert time.monotonic() - start < 5


def _sound_cache(cache: FeatureCache) -> None:
    x, y = cache.arrays()
    assert x.shape == (int(cache.valid.sum()), cache.layout["total_features"]) and np.isfinite(x).all()
    assert ((y >= 0) & (y < len(cache.classes))).all()


@FUZZ
@given(data=st.data(), seal=st.booleans())
def test_feature_cache_manifest(tiny_root, data, seal):
    """seal=True re-signs a damaged manifest (a buggy writer): its fields must still be checked."""
    manifest = json.loads((tiny_root["cache"] / "manifest.json").read_text())
    text = data.draw(damaged_text(manifest))
    if seal:
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            text = json.dumps({**doc, "content_sha256": content_sha256(doc, "content_sha256")})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        shutil.copytree(tiny_root["cache"], root)
        (root / "manifest.json").write_text(text)
        refused_or_sound(lambda: FeatureCache.open(root), str(root), _sound_cache)


def _sound_head(head: TaskHead) -> None:
    x = np.random.default_rng(0).normal(size=(3, head.layout["total_features"])).astype(np.float32)
    logits = head.logits(x)
    assert logits.shape == (3, len(head.classes)) and np.isfinite(logits).all()


@FUZZ
@given(data=st.data(), seal=st.booleans())
def test_task_json(tiny_root, data, seal):
    """seal=True re-signs the damaged task.json (a buggy writer): its fields must still be checked.
    seal=False is an edit after writing: it must always be refused."""
    source = tiny_root["task"] / "head2toe"
    meta = json.loads((source / "task.json").read_text())
    doc = data.draw(damaged(meta))
    if seal and isinstance(doc, dict):
        doc["content_sha256"] = content_sha256(doc, "content_sha256")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "head2toe"
        shutil.copytree(source, root)
        (root / "task.json").write_text(json.dumps(doc))
        head = refused_or_sound(lambda: TaskHead.load(root), str(root), _sound_head)
        if not seal and doc != meta:
            assert head is None, "an edited task.json was loaded"


@FUZZ
@given(data=st.data())
def test_head_safetensors(tiny_root, data):
    """Damaged head bytes whose hashes are re-signed in task.json: the tensors themselves are checked."""
    source = tiny_root["task"] / "head2toe"
    blob = bytearray((source / "head.safetensors").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    blob = bytes(blob[: data.draw(st.integers(1, len(blob)))])
    meta = json.loads((source / "task.json").read_text())
    import hashlib

    meta["head_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["content_sha256"] = content_sha256(meta, "content_sha256")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "head2toe"
        shutil.copytree(source, root)
        (root / "head.safetensors").write_bytes(blob)
        (root / "task.json").write_text(json.dumps(meta))
        refused_or_sound(lambda: TaskHead.load(root), str(root), _sound_head)


def _sound_predictor(predictor: Predictor) -> None:
    with predictor:
        images = np.random.default_rng(0).normal(size=(2, *predictor.preprocess.input_size)).astype(np.float32)
        probabilities, logits = predictor.predict_arrays(images)
        assert probabilities.shape == logits.shape == (2, len(predictor.classes))
        assert np.isfinite(probabilities).all() and np.isfinite(logits).all()


@FUZZ
@given(data=st.data())
def test_runtime_sidecar(tiny_graph, data):
    sidecar = tiny_graph.path.with_suffix(".json")
    original = {**task_sidecar_dict(), "graph_blake3": file_blake3(tiny_graph.path)}
    sidecar.write_text(data.draw(damaged_text(original)))
    refused_or_sound(lambda: Predictor.load(tiny_graph.path), str(sidecar), _sound_predictor)


@FUZZ
@given(data=st.data())
def test_engine_sidecar(tiny_graph, data):
    """An engine built by `h2t-edge build-engine` carries the task sidecar plus a 'build' record."""
    engine = tiny_graph.path.with_name("tiny.onnxruntime.fp16.onnx")
    if not engine.exists():
        shutil.copy(tiny_graph.path, engine)
    original = {**task_sidecar_dict(), "graph_blake3": file_blake3(tiny_graph.path),
                "build": {"backend": "onnxruntime", "precision": "fp16", "artifact": engine.name,
                          "artifact_blake3": file_blake3(engine), "source_sha256": file_sha256(tiny_graph.path)}}
    engine.with_suffix(".json").write_text(data.draw(damaged_text(original)))
    refused_or_sound(lambda: Predictor.load(engine), str(engine.with_suffix(".json")), _sound_predictor)


@FUZZ
@given(data=st.data())
def test_tensorrt_engine_record(tmp_path, data):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    key = EngineKey("0" * 64, "10.0", "GPU", "fp16", BatchProfile.up_to(8))
    original = json.loads(write_engine_record(engine, key).read_text())
    engine.with_suffix(".json").write_text(data.draw(damaged_text(original)))
    # a record that loads must be the one written: the engine's exact key (the record is sealed, so an
    # edited precision, profile or onnx_sha256 is refused, never read as another engine's key)
    refused_or_sound(lambda: check_engine_record(engine, "10.0", "GPU"), str(engine.with_suffix("")),
                     lambda got: _assert_equal(got, key))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(data=st.data())
def test_layout_in_onnx_metadata(tiny_root, data):
    """A backbone whose layout metadata is damaged: read_layout refuses it, or extraction with it gives
    a sound cache, or extraction refuses it; never a cache whose columns disagree with the graph."""
    text = data.draw(damaged_text(tiny_layout(48)))
    small = from_folder(tiny_root["images"]).subset(range(0, 18, 6))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = write_backbone(Path(tmp) / "bb.onnx", 48, text)

        def extract():
            read_layout(onnx_path)
            return extract_features(onnx_path, small, Path(tmp) / "cache", batch_size=2, dtype="float32")

        refused_or_sound(extract, str(onnx_path), _sound_cache)


def _multi_backbone():
    """The tiny backbone exported as `exporters.multi_export` would: its "pool" tap pooled at both
    target sizes (outputs pool12, pool48), pre_logits shared; only the multi layout in its metadata.
    Returns (model, its true multi layout)."""
    from onnx import TensorProto, helper
    from tiny_backbone import PRE_LOGITS, tiny_backbone

    model = tiny_backbone(48)
    graph = model.graph
    graph.node.extend([
        helper.make_node("Identity", ["pool"], ["pool48"]),
        helper.make_node("AveragePool", ["scaled"], ["pooled12"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled12"], ["pool12"], axis=1),
    ])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", d])
                         for name, d in (("pool12", 12), ("pool48", 48), ("pre_logits", PRE_LOGITS))])
    del model.metadata_props[:]
    multi = {"format": "h2t-edge/multi-target-layout", "version": 1, "backbone": "tiny", "target_sizes": [12, 48],
             "layouts": {str(t): tiny_layout(t) for t in (12, 48)},
             "outputs": {str(t): [f"pool{t}", "pre_logits"] for t in (12, 48)}}
    return model, multi


@st.composite
def _misdescribed(draw, multi):
    """Edits that keep a multi layout valid for its schema: lies only the graph can refute (an output
    renamed or moved to another target size, taps reordered, a tap's width changed with offsets and
    total kept consistent, another input or preprocessing for one target size), and true ones that
    must still load (a tap renamed, a target size left out, the sizes listed in another order)."""
    import copy

    m = copy.deepcopy(multi)
    t = draw(st.sampled_from(["12", "48"]))
    layout, outputs = m["layouts"][t], m["outputs"][t]
    kind = draw(st.sampled_from(["rename", "swap_sizes", "reorder", "width", "input", "preprocess",
                                 "keep", "rename_tap", "drop_size", "reorder_sizes"]))
    if kind == "rename":
        i = draw(st.integers(0, len(outputs) - 1))
        outputs[i] = draw(st.sampled_from([outputs[i] + "x", outputs[i].upper(), "pool", "images", "scaled",
                                           "pool12" if t == "48" else "pool48"]))
    elif kind == "swap_sizes":
        m["outputs"]["12"], m["outputs"]["48"] = m["outputs"]["48"], m["outputs"]["12"]
    elif kind == "reorder":
        outputs.reverse()
    elif kind == "width":
        delta = draw(st.sampled_from([-4, -1, 1, 36]))
        layout["taps"][0]["features"] += delta
        layout["taps"][1]["offset"] += delta
        layout["total_features"] += delta
    elif kind == "input":
        layout["input"] = "pixels"
    elif kind == "preprocess":
        layout["preprocess"]["mean"] = [0.25, 0.5, 0.5]
    elif kind == "rename_tap":
        layout["taps"][0]["name"] = "renamed"
    elif kind == "drop_size":
        m["target_sizes"].remove(int(t))
        del m["layouts"][t], m["outputs"][t]
    elif kind == "reorder_sizes":
        m["target_sizes"].reverse()
    return json.dumps(m)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(data=st.data())
def test_multi_target_layout_in_onnx_metadata(tiny_root, data):
    """The multi-target-size export's metadata (exporters.multi_export), damaged or lying: reading it
    and extracting with it is refused naming the file, or gives caches that describe the real graph:
    each target size's outputs are graph outputs of the widths its taps claim, and each cache's
    columns are exactly those outputs of the graph run on the images (checked with ONNX Runtime
    directly, not against the JSON itself)."""
    import onnxruntime as ort

    from h2t_edge.steps.extract import MULTI_LAYOUT_KEY, extract_features_multi, read_multi_layout
    from runtime.preprocess import PreprocessConfig, load_image, preprocess_image

    model, multi = _multi_backbone()
    entry = model.metadata_props.add()
    entry.key, entry.value = MULTI_LAYOUT_KEY, data.draw(st.one_of(damaged_text(multi), _misdescribed(multi)))
    graph_widths = {o.name: o.type.tensor_type.shape.dim[-1].dim_value for o in model.graph.output}
    small = from_folder(tiny_root["images"]).subset(range(0, 18, 6))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "multi.onnx"
        path.write_bytes(model.SerializeToString())

        def extract():
            m = read_multi_layout(path)
            dirs = {t: Path(tmp) / f"T{t}" for t in m["target_sizes"]}
            return m, extract_features_multi(path, small, dirs, batch_size=4, dtype="float32")

        def sound(result):
            m, caches = result
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for t, cache in caches.items():
                layout, outputs = m["layouts"][str(t)], m["outputs"][str(t)]
                _sound_cache(cache)
                assert [graph_widths.get(name) for name in outputs] == [tap["features"] for tap in layout["taps"]], \
                    f"T={t}: outputs {outputs} are not graph outputs of the widths the layout gives its taps"
                assert cache.features.shape[1] == layout["total_features"] == sum(graph_widths[o] for o in outputs)
                pre = PreprocessConfig.from_dict(layout["preprocess"], source="layout")
                images = np.stack([preprocess_image(load_image(p), pre) for p in small.paths])
                real = np.concatenate(session.run(outputs, {layout["input"]: images}), axis=1)
                np.testing.assert_allclose(cache.features, real, rtol=0, atol=1e-6,
                                           err_msg=f"T={t}: the cache's columns are not the graph's outputs")

        refused_or_sound(extract, str(path), sound)
