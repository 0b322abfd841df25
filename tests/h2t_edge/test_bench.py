import numpy as np
import onnx
from onnx import TensorProto, helper

from h2t_edge.core.machine import measured_on
from h2t_edge.serving.bench import BACKBONE, HEAD2TOE, BenchCase, _add_ratios, measure_in_subprocess, format_table, measure


def _tiny_graph(path, scale: float):
    """images[batch, 3, 8, 8] -> GlobalAveragePool -> *scale: a model cheap enough to time in tests."""
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["p"]),
             helper.make_node("Mul", ["p", "s"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 1, 1])],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [scale])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_measure_reports_percentiles_throughput_and_memory(tmp_path):
    case = BenchCase(BACKBONE, _tiny_graph(tmp_path / "a.onnx", 1.0), "onnxruntime", "fp32")
    result = measure(case, batch=4, warmup=2, repeat=12, providers=["CPUExecutionProvider"])
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]
    assert result["images_per_s"] > 0 and result["runs"] == 12 and result["peak_mb"] >= 0


def test_worker_process_and_ratios(tmp_path):
    rows = []
    for graph, scale in ((BACKBONE, 1.0), (HEAD2TOE, 2.0)):
        case = BenchCase(graph, _tiny_graph(tmp_path / f"{scale}.onnx", scale), "onnxruntime", "fp32")
        rows.append({"graph": graph, "backend": "onnxruntime", "precision": "fp32", "bytes": 10,
                     **measure_in_subprocess(case, 4, 2, 10, ["CPUExecutionProvider"])})
    assert all("error" not in r for r in rows), rows
    _add_ratios(rows)
    assert rows[0]["latency_vs_backbone"] == 1.0 and rows[0]["speedup_vs_ort_fp32"] == 1.0
    np.testing.assert_allclose(rows[1]["latency_vs_backbone"], rows[1]["p50_ms"] / rows[0]["p50_ms"])
    table = format_table(rows, {"batch": 4, **measured_on()})
    assert table.count("\n| ") == 3 and "HEAD2TOE task graph" in table


def test_worker_failure_is_reported_not_raised(tmp_path):
    case = BenchCase(BACKBONE, tmp_path / "missing.onnx", "onnxruntime", "fp32")
    assert "error" in measure_in_subprocess(case, 4, 1, 3, ["CPUExecutionProvider"])
