"""ONNX Runtime backend: silent provider probe, SessionLoader errors, runner against numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.backends import OnnxRuntimeRunner, Runner, SessionLoader, available_providers
from runtime.backends.onnxruntime import PROBE_MODEL, PROVIDER_PREFERENCE
from runtime.errors import ArtifactError, BackendUnavailable, H2TRuntimeError

REPO_ROOT = Path(__file__).resolve().parents[2]


def matmul_softmax_model(weights: np.ndarray) -> bytes:
    """x: float32[batch, d] -> y = softmax(x @ W), float32[batch, k]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["y"], axis=-1),
        ],
        "matmul_softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weights.shape[1]])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture
def weights() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_probe_model_is_an_identity_built_with_onnx_helper():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7, producer_name="h2t-edge"
    )
    assert model.SerializeToString() == PROBE_MODEL


def test_available_providers_in_preference_order_cpu_last():
    providers = available_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert providers == [p for p in PROVIDER_PREFERENCE if p in providers]


def test_provider_probe_prints_nothing():
    code = "import json; from runtime.backends import available_providers; print(json.dumps(available_providers()))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stderr == ""
    assert json.loads(result.stdout)[-1] == "CPUExecutionProvider"
    assert result.stdout.count("\n") == 1  # only our own line


def test_runner_matches_numpy(weights):
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    runner = OnnxRuntimeRunner(SessionLoader(matmul_softmax_model(weights), providers=["CPUExecutionProvider"]))
    assert isinstance(runner, Runner)
    with runner:
        assert runner.input_names == ["x"] and runner.output_names == ["y"]
        assert runner.input_shapes() == {"x": ["batch", 4]}
        assert runner.provider == "CPUExecutionProvider"
        assert runner.name == "onnxruntime[CPUExecutionProvider]"
        outputs = runner.infer({"x": x})
    np.testing.assert_allclose(outputs["y"], softmax(x @ weights), rtol=1e-5, atol=1e-6)
    with pytest.raises(H2TRuntimeError, match="not active"):
        runner.infer({"x": x})


def test_runner_accepts_a_built_session(weights):
    session = SessionLoader(matmul_softmax_model(weights))()
    with OnnxRuntimeRunner(session) as runner:
        assert runner.infer({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 3)


def test_int8_products_do_not_saturate():
    """uint8 x int8 products summed in pairs overflow int16 (255 * 127 * 2 > 32767): ONNX Runtime's
    u8s8 kernels on x86 CPUs without VNNI saturate there unless the session asks for u8u8, which
    the runtime's sessions do. Exact against numpy (on VNNI CPUs it holds either way)."""
    weights = np.full((64, 8), 127, np.int8)
    weights[:, 1] = -128
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "W"], ["y"])], "u8s8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", 8])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    a = np.stack([np.full(64, 255, np.uint8), np.arange(64, dtype=np.uint8) * 4])
    with OnnxRuntimeRunner(SessionLoader(model.SerializeToString(), providers=["CPUExecutionProvider"])) as runner:
        y = runner.infer({"a": a})["y"]
    np.testing.assert_array_equal(y, a.astype(np.int64) @ weights.astype(np.int64))


@pytest.mark.parametrize(
    "feed, match",
    [
        ({"x": np.ones((2, 4), np.float64)}, "dtype float64.*float32"),
        ({"images": np.ones((2, 4), np.float32)}, r"missing \['x'\]"),
        ({"x": np.ones((2, 5), np.float32)}, r"shape \[2, 5\]"),
        ({"x": np.ones((4,), np.float32)}, r"shape \[4\]"),
    ],
    ids=["float64", "wrong_name", "wrong_dim", "wrong_rank"],
)
def test_runner_rejects_mismatched_feed(weights, feed, match):
    with OnnxRuntimeRunner(SessionLoader(matmul_softmax_model(weights))) as runner:
        with pytest.raises(ArtifactError, match=match):
            runner.infer(feed)


def test_unknown_provider_is_unavailable(weights):
    with pytest.raises(BackendUnavailable, match=r"NoSuchExecutionProvider.*available: \[.*CPUExecutionProvider"):
        SessionLoader(matmul_softmax_model(weights), providers=["NoSuchExecutionProvider"])()


def test_listed_provider_that_does_not_initialize_is_unavailable(weights):
    import onnxruntime

    broken = [p for p in onnxruntime.get_available_providers() if p not in available_providers()]
    if not broken:
        pytest.skip("every provider this onnxruntime lists initializes here")
    with pytest.raises(BackendUnavailable, match=broken[0]):
        SessionLoader(matmul_softmax_model(weights), providers=[broken[0]])()


def test_missing_and_corrupt_model_files_raise_artifact_error(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ArtifactError, match=str(missing)):
        SessionLoader(missing)()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(ArtifactError, match=str(corrupt)):
        SessionLoader(corrupt)()
