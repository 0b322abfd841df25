"""Native TensorRT backend: cache keys and records (CPU), and engines on a GPU (marked `gpu`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.backends import BatchProfile, create_runner
from runtime.backends.tensorrt import EngineCache, EngineKey, check_engine_record, write_engine_record
from runtime.errors import ArtifactError, BackendUnavailable

KEY = EngineKey("ab" * 32, "10.3.0", "Orin", "fp16", BatchProfile(1, 8, 32))


@pytest.mark.parametrize("field, other", [
    ("onnx_sha256", "cd" * 32), ("tensorrt_version", "11.0.0"), ("gpu_name", "NVIDIA H100"),
    ("precision", "int8"), ("profile", BatchProfile(1, 16, 64)),
])
def test_engine_key_changes_with_every_field(field, other):
    changed = EngineKey(**{**KEY.__dict__, field: other})
    assert changed.digest() != KEY.digest()
    assert EngineKey.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed
    # Timing caches are shared across models and precisions, not across TensorRT versions or GPUs.
    assert (changed.timing_digest() == KEY.timing_digest()) == (field not in ("tensorrt_version", "gpu_name"))


def test_cache_returns_only_an_engine_whose_record_matches(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.lookup(KEY) is None
    cache.store(KEY, b"engine-bytes")
    assert cache.lookup(KEY) == b"engine-bytes"
    # A foreign engine copied under this key's name (another GPU's record) is not loaded.
    foreign = EngineKey(**{**KEY.__dict__, "gpu_name": "Xavier"})
    record = cache.engine_path(KEY).with_suffix(".json")
    record.write_text(json.dumps({**json.loads(record.read_text()), "key": foreign.to_dict()}))
    assert cache.lookup(KEY) is None
    # A stale engine (bytes changed after the record was written) is not loaded either.
    cache.store(KEY, b"engine-bytes")
    cache.engine_path(KEY).write_bytes(b"truncated")
    assert cache.lookup(KEY) is None


def test_prebuilt_engine_for_another_gpu_is_refused(tmp_path):
    engine = tmp_path / "task.engine"
    engine.write_bytes(b"engine-bytes")
    write_engine_record(engine, KEY)
    assert check_engine_record(engine, "10.3.0", "Orin") == KEY
    with pytest.raises(ArtifactError, match="TensorRT 10.3.0 on 'Orin'.*rebuild it here"):
        check_engine_record(engine, "10.3.0", "NVIDIA H100")
    engine.write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="does not match the engine_blake3"):
        check_engine_record(engine, "10.3.0", "Orin")


def test_batch_profile():
    assert BatchProfile.up_to(32) == BatchProfile(1, 16, 32)
    assert BatchProfile.up_to(1) == BatchProfile(1, 1, 1)
    assert BatchProfile(1, 4, 8).shapes((3, 224, 224))[2] == (8, 3, 224, 224)
    with pytest.raises(ValueError):
        BatchProfile(4, 2, 8)


def test_missing_tensorrt_is_backend_unavailable(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(BackendUnavailable, match=r"h2t-edge\[tensorrt\]"):
        create_runner(model, "tensorrt").activate()


def _require_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install 'h2t-edge[tensorrt]'")
    from runtime.backends.tensorrt import gpu_name

    try:
        return gpu_name()
    except BackendUnavailable as exc:
        pytest.skip(f"no usable NVIDIA GPU: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 3e-2)])
def test_engine_matches_onnxruntime_and_is_cached(lite0_onnx, tmp_path, precision, atol):
    _require_gpu()
    path, _ = lite0_onnx
    x = np.random.default_rng(0).normal(size=(3, 3, 224, 224)).astype(np.float32)
    with create_runner(path, "onnxruntime", providers=["CPUExecutionProvider"]) as ort_runner:
        expected = ort_runner.infer({"images": x})
    runner = create_runner(path, "tensorrt", precision=precision, profile=BatchProfile(1, 2, 4), cache_dir=tmp_path)
    with runner:
        outputs = runner.infer({"images": x})
    for name, value in expected.items():
        np.testing.assert_allclose(outputs[name], value, atol=atol, err_msg=name)
    assert runner._source.built
    again = create_runner(path, "tensorrt", precision=precision, profile=BatchProfile(1, 2, 4), cache_dir=tmp_path)
    with again:
        again.infer({"images": x[:1]})
    assert not again._source.built  # loaded from the cache
