"""Lower-precision graphs: ORT int8 QDQ on CPU and for TensorRT; fp16 keeping norm + head fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from exporters.errors import GraphError
from exporters.quantize import convert_to_fp16, fp32_region, quantize_int8_qdq
from exporters.trt_check import check_tensorrt
from runtime.calibration import calibration_batches
from runtime.preprocess import PreprocessConfig


@pytest.fixture(scope="module")
def small_task(lite0, lite0_onnx, tmp_path_factory):
    """A compiled task graph on the first two stages only (fast to build and to run)."""
    from exporters.compile import compile_task_graph

    _, layout = lite0_onnx
    by_name = {t["name"]: t for t in layout["taps"]}
    rng = np.random.default_rng(0)
    features = np.sort(np.concatenate([by_name[n]["offset"] + rng.choice(by_name[n]["features"], 60, replace=False)
                                       for n in ("stem", "blocks.1.0")]))
    weight = rng.normal(size=(len(features), 4)).astype(np.float32)
    model, _ = compile_task_graph(lite0, layout, features, weight, np.zeros(4, np.float32))
    path = tmp_path_factory.mktemp("small_task") / "task.onnx"
    onnx.save(model, str(path))
    return path, PreprocessConfig.from_dict(layout["preprocess"], source="layout")


def _logits(path_or_model, x):
    """Logits as the runtime computes them (its ONNX Runtime session options included)."""
    from runtime.backends.onnxruntime import SessionLoader

    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else path_or_model
    session = SessionLoader(src, providers=["CPUExecutionProvider"])()
    return session.run(["logits"], {"images": x})[0]


def test_int8_cpu_graph_agrees_with_fp32(small_task, photos, tmp_path):
    path, cfg = small_task
    batches = calibration_batches(list(photos.values()), cfg, batch_size=2)
    report = quantize_int8_qdq(path, tmp_path / "int8.onnx", batches, target="cpu")
    # the trunk only (the convolutions and what feeds one): the tap pooling stays fp32
    assert report.calibration_images == len(photos) and report.quantized_nodes > 5
    x = np.concatenate(batches)
    fp32, int8 = _logits(path, x), _logits(report.path, x)
    # Tolerance: int8 moves these logits (range about 2) by up to 0.04 (measured on an AVX-512 VNNI
    # CPU, and on an AVX2 CPU through the runtime's u8u8 session option: 0.29 without it); allow 0.1.
    # The head is random, so near-ties exist: the class must agree wherever fp32's margin
    # between its top two classes exceeds twice that tolerance.
    tolerance = 0.1
    assert np.abs(fp32 - int8).max() < tolerance
    assert np.corrcoef(fp32.ravel(), int8.ravel())[0, 1] > 0.995
    top2 = np.sort(fp32, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert clear.any() and (fp32.argmax(1) == int8.argmax(1))[clear].all()


def test_int8_for_tensorrt_is_symmetric_and_passes_the_check(small_task, photos, tmp_path):
    path, cfg = small_task
    batches = calibration_batches(list(photos.values()), cfg, batch_size=4)
    report = quantize_int8_qdq(path, tmp_path / "int8_trt.onnx", batches, target="tensorrt")
    result = check_tensorrt(report.path)
    assert result.ok, result.summary()
    # The CPU flavour (uint8 activations, int32 biases) is not one TensorRT takes.
    cpu = quantize_int8_qdq(path, tmp_path / "int8_cpu.onnx", batches, target="cpu")
    assert {f.rule for f in check_tensorrt(cpu.path).findings} == {"restriction", "dtype"}


def test_int8_needs_calibration(small_task, tmp_path):
    with pytest.raises(GraphError, match="calibration"):
        quantize_int8_qdq(small_task[0], tmp_path / "x.onnx", [])


def test_fp16_keeps_normalization_and_head_fp32(small_task):
    path, _ = small_task
    model = onnx.load(str(path))
    keep = fp32_region(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {"ReduceL2", "Div", "Gather", "MatMul", "Softmax"} <= {ops[n] for n in keep}
    assert "Conv" not in {ops[n] for n in keep}
    half = convert_to_fp16(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in half.graph.value_info}
    by_name = {n.name: n for n in half.graph.node}
    for name in keep:  # the named nodes compute in fp32 ...
        for out in by_name[name].output:
            assert types.get(out, TensorProto.FLOAT) == TensorProto.FLOAT, (name, out)
    convs = [n for n in half.graph.node if n.op_type == "Conv"]
    assert all(types[c.output[0]] == TensorProto.FLOAT16 for c in convs)  # ... and the rest in fp16
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [TensorProto.FLOAT] * 2
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    fp32, fp16 = _logits(path, x), _logits(half, x)
    np.testing.assert_allclose(fp16, fp32, atol=0.02 * np.abs(fp32).max())
    assert check_tensorrt(half).ok


def test_cli_build_engine_then_check(small_task, lite0_onnx, photos, tmp_path):
    import json

    from click.testing import CliRunner

    from h2t_edge.cli import cli
    from h2t_edge.steps.extract import LAYOUT_KEY

    # the layout in the graph's metadata tells build-engine how to preprocess the calibration images
    model = onnx.load(str(small_task[0]))
    onnx.helper.set_model_props(model, {LAYOUT_KEY: json.dumps(lite0_onnx[1])})
    path = tmp_path / "task.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "task.int8.onnx"
    result = CliRunner().invoke(cli, ["build-engine", str(path), "--precision", "int8",
                                      "--calib", str(photos["chelsea"].parent), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "calibrated on 4 images" in result.output
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["build"]["precision"] == "int8" and sidecar["build"]["backend"] == "onnxruntime"
    # the fp32 graph passes TensorRT's parser check; the CPU int8 flavour does not, and says why
    result = CliRunner().invoke(cli, ["check", str(path), "--tensorrt", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True
    result = CliRunner().invoke(cli, ["check", str(out), "--tensorrt"])
    assert result.exit_code == 1
    assert "dtype" in result.output or "restriction" in result.output
