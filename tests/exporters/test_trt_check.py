"""The static TensorRT check: real exported graphs pass, hand-built bad graphs fail by node name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.errors import GraphError
from exporters.trt_check import OPSET_RANGE, SUPPORTED_OPS, check_tensorrt


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bad", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def value(name, dtype=TensorProto.FLOAT, shape=("batch", 4)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def relu_model(opset=17, shape=("batch", 4)):
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [value("x", shape=shape)],
                      [value("y", shape=shape)], opset=opset)


def test_exported_backbone_passes(lite0_onnx):
    path, _ = lite0_onnx
    report = check_tensorrt(path)
    assert report.ok, report.summary()
    assert report.opset == 18 and report.nodes > 100


def test_compiled_task_graph_passes(lite0, lite0_onnx):
    from exporters.compile import compile_task_graph

    _, layout = lite0_onnx
    by_name = {t["name"]: t for t in layout["taps"]}
    features = np.sort(np.concatenate([by_name[n]["offset"] + np.arange(0, 40, 3) for n in ("stem", "blocks.1.0")]))
    weight = np.random.default_rng(0).normal(size=(len(features), 3)).astype(np.float32)
    model, _ = compile_task_graph(lite0, layout, features, weight, np.zeros(3, np.float32))
    report = check_tensorrt(model)
    assert report.ok, report.summary()
    assert {"Gather", "MatMul", "Softmax"} <= {n.op_type for n in model.graph.node}


def test_plain_relu_passes():
    assert check_tensorrt(relu_model()).ok


@pytest.mark.parametrize("opset", [OPSET_RANGE[0] - 1, OPSET_RANGE[1] + 1])
def test_opset_out_of_range(opset):
    report = check_tensorrt(relu_model(opset=opset))
    assert [f.rule for f in report.findings] == ["opset"]
    assert f"opset {opset}" in report.findings[0].message


def test_unsupported_operator_named():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="ok_relu"),
        helper.make_node("Det", ["r"], ["y"], name="the_det"),
    ]
    model = make_model(nodes, [value("x", shape=("batch", 4, 4))], [value("y", shape=("batch",))])
    report = check_tensorrt(model)
    assert [(f.rule, f.node, f.op) for f in report.findings] == [("operator", "the_det", "Det")]
    assert "Det" not in SUPPORTED_OPS


def test_custom_domain_operator_named():
    node = helper.make_node("FusedGemm", ["x"], ["y"], name="ms_gemm", domain="com.microsoft")
    model = make_model([node], [value("x")], [value("y")])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report = check_tensorrt(model)
    assert [(f.rule, f.node) for f in report.findings] == [("operator", "ms_gemm")]


def test_float64_tensor_named():
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Relu", ["x64"], ["y"], name="relu64"),
    ]
    model = make_model(nodes, [value("x")], [value("y", TensorProto.DOUBLE)])
    report = check_tensorrt(model)
    dtype = report.by_rule("dtype")
    assert {f.node for f in dtype} == {"to_double", "relu64"}  # produces float64 / runs on float64
    assert any("float64" in f.message for f in dtype)


def test_quantized_types_only_between_q_and_dq():
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    good = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dq"),
    ]
    assert check_tensorrt(make_model(good, [value("x")], [value("y")], [scale, zero])).ok
    bad = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q"),
        helper.make_node("Cast", ["q"], ["y"], name="leak", to=TensorProto.FLOAT),
    ]
    report = check_tensorrt(make_model(bad, [value("x")], [value("y")], [scale, zero]))
    # The int8 tensor leaks out of Q/DQ, and the Cast reads a type TensorRT's Cast does not take.
    assert {(f.rule, f.node) for f in report.findings} == {("dtype", "q"), ("dtype", "leak")}
    nonzero = numpy_helper.from_array(np.array(3, np.int8), "zero")
    report = check_tensorrt(make_model(good, [value("x")], [value("y")], [scale, nonzero]))
    assert {(f.rule, f.node) for f in report.findings} == {("restriction", "q"), ("restriction", "dq")}


def test_data_dependent_loop_named():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("Relu", ["acc_in"], ["acc_out"], name="body_relu")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         value("acc_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), value("acc_out")],
    )
    nodes = [
        helper.make_node("Constant", [], ["keep_going"], name="true",
                         value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], name="the_loop", body=body),
    ]
    inputs = [value("x"), helper.make_tensor_value_info("trips", TensorProto.INT64, [])]
    report = check_tensorrt(make_model(nodes, inputs, [value("y")]))
    assert [(f.rule, f.node, f.op) for f in report.findings] == [("control-flow", "the_loop", "Loop")]
    assert "trips" in report.findings[0].message


def test_nonzero_driven_shape_named():
    nodes = [
        helper.make_node("NonZero", ["x"], ["idx"], name="where_nonzero"),
        helper.make_node("Cast", ["idx"], ["y"], name="cast", to=TensorProto.FLOAT),
    ]
    model = make_model(nodes, [value("x")], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    report = check_tensorrt(model)
    assert {f.node for f in report.findings} == {"where_nonzero"}
    assert {f.rule for f in report.findings} == {"control-flow", "dynamic-shape"}


def test_non_batch_dynamic_dim_named():
    shape = ("batch", 3, "height", "width")
    conv = helper.make_node("Conv", ["images", "w"], ["y"], name="conv", kernel_shape=[1, 1])
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    model = make_model([conv], [value("images", shape=shape)], [value("y", shape=("batch", 2, "height", "width"))], [w])
    report = check_tensorrt(model)
    assert [(f.rule, f.node, f.op) for f in report.findings] == [("dynamic-shape", "images", "<input>")] * 2
    assert "axis 2" in report.findings[0].message and "axis 3" in report.findings[1].message
    # A profile that covers those axes too makes it acceptable.
    assert check_tensorrt(model, dynamic_axes={"images": [0, 2, 3]}).ok


def test_axes_must_be_constant():
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean_dyn_axes")]
    inputs = [value("x"), helper.make_tensor_value_info("axes", TensorProto.INT64, [1])]
    report = check_tensorrt(make_model(nodes, inputs, [value("y")], opset=18))
    assert [(f.rule, f.node) for f in report.findings] == [("restriction", "mean_dyn_axes")]


def test_unreadable_file_is_a_typed_error(tmp_path):
    with pytest.raises(GraphError, match="does not exist"):
        check_tensorrt(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(GraphError, match="bad.onnx"):
        check_tensorrt(bad)


def test_shape_from_data_values_named_but_reshape_of_batch_passes():
    flat = [helper.make_node("Reshape", ["x", "flat_shape"], ["y"], name="flatten_batch")]
    ok = make_model(flat, [value("x", shape=("batch", 2, 2))], [value("y", shape=(None, 4))],
                    [numpy_helper.from_array(np.array([-1, 4], np.int64), "flat_shape")])
    assert check_tensorrt(ok).ok  # 'unk' from Reshape(-1) still follows from the batch
    nodes = [
        helper.make_node("Cast", ["x"], ["x_int"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "x_int"], ["y"], name="reshape_by_values"),
    ]
    bad = make_model(nodes, [value("x", shape=(2,))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    report = check_tensorrt(bad)
    assert [(f.rule, f.node) for f in report.findings] == [("dynamic-shape", "reshape_by_values")]
