"""A static check that TensorRT's ONNX parser will accept a graph, without TensorRT or a GPU.

`check_tensorrt(model)` reports every node that would stop a TensorRT build or make it behave
differently from ONNX Runtime: an opset outside the parser's range, an operator it lacks, a data
type it does not take, a dynamic dimension that no optimization profile covers (profiles here
cover the batch axis of the inputs only), and control flow whose shape depends on data.
It is strict on purpose: passing it means the graph builds on a device; failing it names the
node to fix on the desk, before an engine build on a Jetson tells you.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import GraphError

# Parser facts from onnx-tensorrt docs/operators.md at the "ONNX-TensorRT 10.1 GA release"
# (commit 96e7811, June 2024): opsets 9..20 inclusive; per-operator support and data types.
# TensorRT 10.x releases after 10.1 only add operators, so this table is conservative for them.
TRT_PARSER_VERSION = "10.1"
OPSET_RANGE = (9, 20)

_F = ("FLOAT", "FLOAT16", "BFLOAT16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)
_B = ("BOOL",)

# Operator -> data types its first (data) input may have. Operators the parser lists as
# unsupported are simply absent. (The source writes "INF64" for ConstantOfShape: read INT64.)
SUPPORTED_OPS: dict[str, tuple[str, ...]] = {
    **{op: _F for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization",
        "Ceil", "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Einsum", "Elu",
        "Erf", "Exp", "Floor", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
        "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax", "ImageScaler",
        "InstanceNormalization", "IsInf", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax",
        "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "MaxPool", "MeanVarianceNormalization",
        "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike",
        "RandomUniform", "RandomUniformLike", "Reciprocal", "Resize", "RNN", "Round", "ScaledTanh",
        "Scan", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan",
        "Tanh", "ThresholdedRelu", "Upsample", "Dropout",
    )},
    **{op: ("FLOAT", "FLOAT16") for op in (
        "DeformConv", "GridSample", "Mish", "NonMaxSuppression", "NonZero", "RoiAlign",
    )},
    **{op: _FI for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual",
        "IsNaN", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Range",
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Scatter",
        "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth", "Sub", "Sum", "TopK",
    )},
    **{op: _FIB for op in (
        "Concat", "Constant", "ConstantOfShape", "Expand", "EyeLike", "Flatten", "Gather",
        "GatherElements", "GatherND", "Identity", "If", "Loop", "OneHot", "Reshape",
        "ReverseSequence", "Shape", "Size", "Slice", "Split", "Squeeze", "Tile", "Transpose",
        "Trilu", "Unsqueeze", "Where",
    )},
    **{op: _B for op in ("And", "Not", "Or", "Xor")},
    "Cast": _FIB + ("UINT8",),
    "CastLike": _FIB + ("UINT8",),
    "DequantizeLinear": ("INT8", "FLOAT8E4M3FN", "INT4"),
    "Gelu": _FI + ("INT8",),
    "Mean": _FI + ("FLOAT8E4M3FN",),
}

# Tensor types the parser takes anywhere; the quantized and uint8 types only in the places below.
_PLAIN_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL"}
_QUANTIZED_TYPES = {"INT8", "INT4", "FLOAT8E4M3FN"}  # only from QuantizeLinear / into DequantizeLinear
_IO_ONLY_TYPES = {"UINT8"}  # only as a network input or output

# Operators whose output shape depends on the values of their input: no profile can cover it.
_DATA_DEPENDENT_SHAPE_OPS = {"NonZero", "NonMaxSuppression", "Unique", "Compress"}

# Inputs that the parser needs as build-time constants (operator -> input index, what it is).
_CONSTANT_INPUTS = {
    **{op: (1, "axes") for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze",
    )},
    "Slice": (3, "axes"),
    "Pad": (3, "axes"),
    "CumSum": (1, "axis"),
    "OneHot": (1, "depth"),
}

_RESIZE_COORDINATE_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}

ModelSource = Union[str, os.PathLike, onnx.ModelProto]


@dataclass(frozen=True)
class TrtFinding:
    """One reason the parser would refuse the graph. `node` is the node's name (or the tensor's
    name for graph inputs and initializers), `op` its operator ('<input>', '<initializer>',
    '<model>' for whole-graph findings)."""

    rule: str  # opset | operator | dtype | dynamic-shape | control-flow | restriction
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node} ({self.op}): {self.message}"


@dataclass
class TrtCheckReport:
    """The findings of `check_tensorrt` for one model; `ok` when there are none."""

    model: str
    opset: int
    nodes: int
    parser_version: str = TRT_PARSER_VERSION
    findings: list[TrtFinding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def by_rule(self, rule: str) -> list[TrtFinding]:
        return [f for f in self.findings if f.rule == rule]

    def summary(self) -> str:
        head = (f"{self.model}: opset {self.opset}, {self.nodes} nodes, checked against the "
                f"TensorRT {self.parser_version} ONNX parser: ")
        if self.ok:
            return head + "OK"
        return head + f"{len(self.findings)} problem(s)\n" + "\n".join(f"  {f}" for f in self.findings)

    def to_dict(self) -> dict:
        return {"model": self.model, "opset": self.opset, "nodes": self.nodes, "ok": self.ok,
                "parser_version": self.parser_version,
                "findings": [f.__dict__ for f in self.findings]}


def load_model(source: ModelSource) -> tuple[onnx.ModelProto, str]:
    """(model, display name); a path that is missing or not ONNX is a GraphError naming it."""
    if isinstance(source, onnx.ModelProto):
        return source, source.graph.name or "<in-memory model>"
    path = Path(source)
    if not path.is_file():
        raise GraphError(f"ONNX model {path} does not exist; check the path")
    try:
        return onnx.load(str(path)), str(path)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise GraphError(f"{path} is not a readable ONNX model ({exc}); re-export it") from None


def check_tensorrt(source: ModelSource, dynamic_axes: dict[str, Sequence[int]] | None = None) -> TrtCheckReport:
    """Check `source` (path or ModelProto) against the TensorRT ONNX parser's rules.

    dynamic_axes: input name -> axes an optimization profile covers; default: axis 0 (batch)
    of every input, which is what h2t-edge's engine builder profiles.
    """
    model, name = load_model(source)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # an inconsistent graph: checking further would only guess
        raise GraphError(f"ONNX shape inference fails on {name} ({exc}); the graph is broken, re-export it") from None
    graph = inferred.graph
    report = TrtCheckReport(model=name, opset=opset, nodes=sum(1 for _ in _walk_nodes(graph)))
    findings = report.findings

    lo, hi = OPSET_RANGE
    if not lo <= opset <= hi:
        findings.append(TrtFinding(
            "opset", "<model>", "<model>",
            f"default-domain opset {opset} is outside the parser's range {lo}..{hi}; "
            f"re-export with an opset in that range (h2t-edge exports opset 18)"))

    constants = _constant_names(graph)
    findings += _check_nodes(graph, constants)
    findings += _check_types(graph)
    findings += _check_dynamic_dims(graph, dynamic_axes)
    return report


# -- nodes: operators, restrictions, control flow ----------------------------------------------

def _walk_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node, including those in If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g)
            for sub in attr.graphs:
                yield from _walk_nodes(sub)


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or f"<unnamed {node.op_type} -> {', '.join(node.output)}>"


def _constant_names(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Tensors whose value is known at build time: initializers and Constant outputs."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in _walk_nodes(graph):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_nodes(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> list[TrtFinding]:
    findings = []
    types = _tensor_types(graph)
    for node in _walk_nodes(graph):
        name, op = _node_name(node), node.op_type

        def flag(rule: str, message: str) -> None:
            findings.append(TrtFinding(rule, name, op, message))

        if node.domain not in ("", "ai.onnx"):
            flag("operator", f"custom domain '{node.domain}' needs a TensorRT plugin; export with standard ONNX operators")
            continue
        if op not in SUPPORTED_OPS:
            flag("operator", "not supported by the TensorRT ONNX parser; replace it or change the model")
            continue
        data_type = types.get(node.input[0]) if node.input and node.input[0] else None
        if data_type is not None and data_type not in SUPPORTED_OPS[op]:
            flag("dtype", f"input '{node.input[0]}' is {data_type}; TensorRT's {op} takes {', '.join(SUPPORTED_OPS[op])}")
        if op in _DATA_DEPENDENT_SHAPE_OPS:
            flag("control-flow", "output shape depends on input values; no optimization profile can cover it")
        findings += [TrtFinding(rule, name, op, msg) for rule, msg in _restrictions(node, constants)]
    return findings


def _restrictions(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """Per-operator restrictions of the parser that can be decided without running the graph."""
    op, out = node.op_type, []
    if op in _CONSTANT_INPUTS:
        index, what = _CONSTANT_INPUTS[op]
        if len(node.input) > index and node.input[index] and node.input[index] not in constants:
            out.append(("restriction", f"'{what}' (input '{node.input[index]}') must be an initializer or Constant"))
    if op == "If" and node.input[0] not in constants:
        out.append(("control-flow", f"branch condition '{node.input[0]}' is computed from data; "
                                     "TensorRT needs shape-stable branches, fold the condition to a constant"))
    if op == "Loop":
        trip, cond = (list(node.input) + ["", ""])[:2]
        dynamic = [n for n in (trip, cond) if n and n not in constants]
        if dynamic or not trip:
            out.append(("control-flow", f"trip count / condition {dynamic or ['<none>']} depend on data; "
                                         "unroll the loop or make its trip count a constant"))
    if op in ("AveragePool", "MaxPool", "LpPool"):
        kernel = _attr(node, "kernel_shape", [])
        if op != "LpPool" and len(kernel) not in (2, 3):
            out.append(("restriction", f"{len(kernel)}-D pooling; TensorRT pools 2-D or 3-D only"))
        if any(d != 1 for d in _attr(node, "dilations", [])):
            out.append(("restriction", "dilations must be all ones"))
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        out.append(("restriction", "the Indices output is not supported"))
    if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in constants:
        if np.any(constants[node.input[2]] != 0):
            out.append(("restriction", "zero point must be 0 (symmetric quantization); quantize with symmetric activations and weights"))
    if op == "TopK" and _attr(node, "sorted", 1) != 1:
        out.append(("restriction", "'sorted' must be 1"))
    if op == "Resize":
        if _attr(node, "antialias", 0):
            out.append(("restriction", "antialiasing is not supported"))
        mode = _attr(node, "coordinate_transformation_mode", b"half_pixel")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in _RESIZE_COORDINATE_MODES:
            out.append(("restriction", f"coordinate_transformation_mode '{mode}' is not supported"))
    if op == "LayerNormalization" and any(node.output[1:]):
        out.append(("restriction", "only the first output (Y) is supported"))
    if op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute):
        out.append(("dtype", "sparse and string constants are not supported"))
    return out


# -- data types -------------------------------------------------------------------------------

def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def _tensor_types(graph: onnx.GraphProto) -> dict[str, str]:
    """Tensor name -> element type name, from inputs, outputs, value_info and initializers."""
    types = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = _type_name(vi.type.tensor_type.elem_type)
    for init in graph.initializer:
        types[init.name] = _type_name(init.data_type)
    for node in _walk_nodes(graph):
        if node.op_type == "Constant":
            value = _attr(node, "value")
            if value is not None:
                types[node.output[0]] = _type_name(value.data_type)
    return types


def _check_types(graph: onnx.GraphProto) -> list[TrtFinding]:
    types = _tensor_types(graph)
    producers = {o: n for n in _walk_nodes(graph) for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in _walk_nodes(graph):
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    io_names = {v.name for v in list(graph.input) + list(graph.output)}
    initializers = {i.name for i in graph.initializer}
    findings = []
    for tensor, dtype in sorted(types.items()):
        if dtype in _PLAIN_TYPES:
            continue
        if dtype in _QUANTIZED_TYPES:
            users = {c.op_type for c in consumers.get(tensor, [])}
            made_by_q = tensor in producers and producers[tensor].op_type == "QuantizeLinear"
            if made_by_q and users <= {"DequantizeLinear"}:
                continue
            # Quantized weights and zero points are initializers read by Q/DQ nodes.
            if tensor in initializers and users <= {"QuantizeLinear", "DequantizeLinear"}:
                continue
            why = "is a quantized type: TensorRT takes it only between QuantizeLinear and DequantizeLinear"
        elif dtype in _IO_ONLY_TYPES and tensor in io_names:
            continue
        elif dtype in _IO_ONLY_TYPES:
            why = "is allowed only as a network input or output; cast it at the boundary"
        elif dtype == "DOUBLE":
            why = "is float64: TensorRT would clamp it to float32; export in float32"
        else:
            why = "is not a TensorRT type"
        if tensor in producers:
            node = producers[tensor]
            where, op = _node_name(node), node.op_type
        else:
            where, op = tensor, "<initializer>" if tensor in initializers else "<input>"
        findings.append(TrtFinding("dtype", where, op, f"tensor '{tensor}' {dtype} {why}"))
    return findings


# -- dynamic dimensions -----------------------------------------------------------------------

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Inputs that set an output's shape by their values (operator -> input indices).
_SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Resize": (2, 3), "Upsample": (1,), "Pad": (1,), "TopK": (1,), "OneHot": (1,),
}


def _check_dynamic_dims(graph: onnx.GraphProto, dynamic_axes: dict[str, Sequence[int]] | None) -> list[TrtFinding]:
    """Every dimension must be static or follow from the profiled input axes (the batch).

    ONNX shape inference cannot name some derived dims (a Reshape to [-1, n] of a batch-sized
    tensor gives 'unk__0'), so an unnamed dim is judged by where its tensor comes from: it is
    uncovered only where its values-to-shape path starts at data (NonZero and friends, or a shape
    computed from tensor values rather than from Shape/constants) or at an unprofiled input axis.
    """
    findings: list[TrtFinding] = []
    initializers = {i.name for i in graph.initializer}
    constants = set(_constant_names(graph))
    tainted: set[str] = set()
    covered: set[str] = set()
    for vi in graph.input:
        if vi.name in initializers:
            continue
        axes = set(dynamic_axes.get(vi.name, ()) if dynamic_axes is not None else (0,))
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                continue
            if axis in axes and dim.dim_param:
                covered.add(dim.dim_param)
                continue
            tainted.add(vi.name)
            findings.append(TrtFinding(
                "dynamic-shape", vi.name, "<input>",
                f"axis {axis} is dynamic ('{dim.dim_param or '<unknown>'}') but the optimization profile covers "
                f"only the batch axis; fix it to a number at export"))

    shape_like: set[str] = set(constants)  # tensors whose values follow from shapes/constants only
    dims = {vi.name: vi.type.tensor_type.shape.dim for vi in list(graph.value_info) + list(graph.output)}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type in ("Shape", "Size") or all(i in shape_like for i in node.input if i):
            shape_like.update(node.output)
        inherited = any(i in tainted for i in node.input)
        shape_from_data = [node.input[k] for k in _SHAPE_INPUTS.get(node.op_type, ())
                           if k < len(node.input) and node.input[k] and node.input[k] not in shape_like]
        origin = not inherited and (node.op_type in _DATA_DEPENDENT_SHAPE_OPS or bool(shape_from_data))
        if not (inherited or origin):
            continue
        tainted.update(node.output)
        if not origin:
            continue  # reported where it started
        for out in node.output:
            for axis, dim in enumerate(dims.get(out, ())):
                symbols = set(_SYMBOL.findall(dim.dim_param))
                if dim.HasField("dim_value") or (symbols and symbols <= covered):
                    continue
                why = (f"is set by the values of {shape_from_data}" if shape_from_data
                       else "depends on the input's values")
                findings.append(TrtFinding(
                    "dynamic-shape", _node_name(node), node.op_type,
                    f"output '{out}' axis {axis} ('{dim.dim_param or '<unknown>'}') {why}; "
                    "no optimization profile covers it, make it static"))
                break
    return findings
