"""Lower-precision copies of an exported or compiled graph, as ONNX.

- `quantize_int8_qdq`: ONNX Runtime static quantization in QDQ format (per-channel int8
  weights), calibrated on task images; for the CPU (uint8 activations, ONNX Runtime's fast path)
  or for TensorRT (symmetric int8 activations: explicit quantization needs zero points of 0).
- `quantize_int8_nncf`: NNCF post-training quantization of the ONNX graph (symmetric int8
  activations, the layout OpenVINO's int8 CPU kernels run), also as QDQ ONNX.
- `convert_to_fp16`: an fp16 graph for strongly typed TensorRT (11.x has no FP16 builder flag),
  keeping chosen nodes (the L2 normalization and the head) in fp32.

All of them quantize the backbone's trunk only (`trunk_nodes`: the convolutions and everything
that feeds one) and leave the tap pooling, the per-tap L2 normalization, the gather and the head in
fp32: the norm sums hundreds of squares (beyond fp16's 65504) and the head's logits decide the
class. Because the QDQ graph is plain ONNX, the graph a head is fitted on and the task graph
compiled from it (`exporters.attach`) carry the same quantization parameters, node for node.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import GraphError
from .trt_check import load_model

ModelSource = Union[str, os.PathLike, onnx.ModelProto]

# Operators that start the part of an h2t-edge graph kept in fp32: from the per-tap L2 norm on,
# and the head (Gemm logits of a backbone, MatMul + Softmax of a task graph).
FP32_SEED_OPS = ("ReduceL2", "Gemm", "MatMul", "Softmax")

# Quantized by default: the convolutions and what sits between them, so that ONNX Runtime fuses
# whole Conv-Clip-Add chains in int8 (Conv alone ran slower than fp32 on EfficientNet-Lite0), within
# the trunk only: an AveragePool or Clip of the tap pooling stays fp32 (`trunk_nodes`).
INT8_OP_TYPES = ("Conv", "Clip", "Add", "AveragePool")
QUANTIZE_TARGETS = ("cpu", "tensorrt")
# Calibration methods of ONNX Runtime's quantizer. The default was chosen by measurement
# (benchmarks/bench_calibration.py -> results/calibration.md: fidelity of the pooled features of
# held-out images to fp32, over methods and image counts).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_CALIBRATION = "percentile"
DEFAULT_CALIBRATION_IMAGES = 64

# Float inputs that ONNX requires in float32 whatever the data type (operator -> input indices).
_FLOAT32_ONLY_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}


@dataclass(frozen=True)
class QuantizeReport:
    path: Path
    calibration_images: int
    quantized_nodes: int
    op_types: tuple[str, ...]
    method: str = "minmax"
    calibration_sha256: str = ""  # `calibration_digest` of the batches and the recipe


def calibration_digest(batches: Sequence[np.ndarray], **recipe) -> str:
    """sha256 over the calibration batches (float32, C order, in order) and the recipe's settings:
    two graphs with the same digest were calibrated on the same inputs the same way."""
    h = hashlib.sha256(repr(sorted(recipe.items())).encode())
    for b in batches:
        h.update(np.ascontiguousarray(b, dtype=np.float32).tobytes())
    return h.hexdigest()


def trunk_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the backbone's trunk: every Conv and every node that feeds one. What lies outside it
    in an h2t-edge graph is the tap pooling, the L2 normalization, the gather and the head (and the
    last pooling after the final convolution): the part kept in fp32."""
    producer = {o: n for n in model.graph.node for o in n.output}
    keep: set[str] = set()
    stack = [n for n in model.graph.node if n.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        stack += [producer[i] for i in node.input if i in producer]
    return keep


def _outside_trunk(model: onnx.ModelProto) -> list[str]:
    names = [n.name for n in model.graph.node]
    if len(set(names)) != len(names) or not all(names):
        raise GraphError("int8 quantization needs unique node names; name the nodes (export does)")
    trunk = trunk_nodes(model)
    return [n for n in names if n not in trunk]


class _BatchReader:
    """An onnxruntime.quantization.CalibrationDataReader over preprocessed batches."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self.input_name = input_name
        self.batches = list(batches)
        self._next = 0

    def get_next(self):
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return {self.input_name: np.ascontiguousarray(self.batches[self._next - 1], dtype=np.float32)}

    def rewind(self) -> None:
        self._next = 0


def _calibration_input(source: ModelSource, batches: Sequence[np.ndarray]) -> tuple[onnx.ModelProto, str, str]:
    """(model, its name, its one image input) of a graph to calibrate on `batches`."""
    model, name = load_model(source)
    if not batches:
        raise GraphError(f"no calibration batches for {name}; pass a folder of task images with --calib")
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise GraphError(f"{name} has inputs {inputs}; int8 calibration feeds graphs with exactly one image input")
    return model, name, inputs[0]


def quantize_int8_qdq(
    source: ModelSource,
    output: Union[str, os.PathLike],
    batches: Sequence[np.ndarray],
    target: str = "cpu",
    op_types: Sequence[str] = INT8_OP_TYPES,
    per_channel: bool = True,
    method: str = "minmax",
    trunk_only: bool = True,
) -> QuantizeReport:
    """Write an int8 QDQ copy of `source` to `output`, calibrated on `batches` (float32[b, 3, H, W]
    each, preprocessed as the graph expects) with `method` (one of CALIBRATION_METHODS).

    target 'cpu': uint8 asymmetric activations (ONNX Runtime's fast x86 kernels; symmetric int8
    activations ran 4x slower there); 'tensorrt': symmetric int8 activations and weights,
    zero points 0, as TensorRT's explicit quantization requires. Weights are int8 per channel.
    trunk_only: quantize `trunk_nodes` only (pooling, normalization, gather and head stay fp32).
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if target not in QUANTIZE_TARGETS:
        raise GraphError(f"int8 target {target!r} is not one of {QUANTIZE_TARGETS}")
    if method not in CALIBRATION_METHODS:
        raise GraphError(f"calibration method {method!r} is not one of {CALIBRATION_METHODS}")
    model, name, image_input = _calibration_input(source, batches)
    reader = type("Reader", (_BatchReader, CalibrationDataReader), {})(image_input, batches)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        # The calibrator writes an augmented copy of the model next to its input.
        staged = Path(scratch) / "model.onnx"
        onnx.save(model, str(staged))
        # The quantizer logs advice on the root logger; the CLI prints only our own lines.
        logging.disable(logging.WARNING)
        try:
            quantize_static(
                str(staged), str(output), reader, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types), per_channel=per_channel,
                activation_type=QuantType.QUInt8 if target == "cpu" else QuantType.QInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=_outside_trunk(model) if trunk_only else [],
                calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                  "entropy": CalibrationMethod.Entropy}[method],
                # TensorRT takes float biases and zero points of 0 only.
                extra_options={"ActivationSymmetric": target == "tensorrt", "WeightSymmetric": True,
                               "QuantizeBias": target != "tensorrt"},
            )
        except Exception as exc:  # the quantizer raises plain exceptions from deep inside
            raise GraphError(f"int8 quantization of {name} failed: {type(exc).__name__}: {exc}") from None
        finally:
            logging.disable(logging.NOTSET)
    quantized = onnx.load(str(output), load_external_data=False)
    # Keep the metadata (feature layout...) the runtime reads from the original.
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    onnx.save(quantized, str(output))
    count = sum(1 for n in quantized.graph.node if n.op_type == "QuantizeLinear")
    digest = calibration_digest(batches, quantizer="onnxruntime", target=target, method=method,
                                op_types=list(op_types), per_channel=per_channel, trunk_only=trunk_only)
    return QuantizeReport(output, sum(len(b) for b in batches), count, tuple(op_types), method, digest)


def quantize_int8_nncf(source: ModelSource, output: Union[str, os.PathLike],
                       batches: Sequence[np.ndarray]) -> QuantizeReport:
    """Write an int8 QDQ copy of `source` to `output` made by NNCF's post-training quantization
    (`nncf.quantize`, its defaults: symmetric int8 activations, per-channel weights, bias
    correction), calibrated on `batches`, with everything outside `trunk_nodes` in an ignored scope
    (fp32). OpenVINO reads the QDQ ONNX and runs it with its int8 kernels."""
    try:
        import nncf
    except ImportError:
        raise GraphError("OpenVINO int8 is made with NNCF: pip install nncf (or h2t-edge[openvino])") from None
    model, name, image_input = _calibration_input(source, batches)
    dataset = nncf.Dataset([{image_input: np.ascontiguousarray(b, dtype=np.float32)} for b in batches])
    logging.disable(logging.WARNING)
    try:
        quantized = nncf.quantize(model, dataset, subset_size=sum(len(b) for b in batches),
                                  ignored_scope=nncf.IgnoredScope(names=_outside_trunk(model)))
    except Exception as exc:  # NNCF raises plain exceptions from deep inside
        raise GraphError(f"NNCF int8 quantization of {name} failed: {type(exc).__name__}: {exc}") from None
    finally:
        logging.disable(logging.NOTSET)
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, str(output))
    count = sum(1 for n in quantized.graph.node if n.op_type == "QuantizeLinear")
    digest = calibration_digest(batches, quantizer="nncf", version=nncf.__version__)
    return QuantizeReport(output, sum(len(b) for b in batches), count, ("nncf default",), "nncf", digest)


# -- fp16 ---------------------------------------------------------------------------------------

def fp32_region(model: onnx.ModelProto, seed_ops: Iterable[str] = FP32_SEED_OPS) -> set[str]:
    """Names of the nodes to keep in fp32: every node of a `seed_ops` type and all nodes
    downstream of one (for h2t-edge graphs: the L2 normalization of each tap and the head)."""
    seeds = set(seed_ops)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    keep: set[str] = set()
    stack = [n for n in model.graph.node if n.op_type in seeds]
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        stack += [c for o in node.output for c in consumers.get(o, [])]
    return keep


def convert_to_fp16(
    source: ModelSource, keep_fp32: Union[set[str], Callable[[onnx.ModelProto], set[str]]] = fp32_region
) -> onnx.ModelProto:
    """An fp16 copy of `source` whose nodes named in `keep_fp32` (or returned by it, called on
    the model) compute in fp32. Inputs and outputs stay float32; Cast nodes are inserted where
    the two regions meet. Every node must have a unique name."""
    model, name = load_model(source)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never edit the caller's copy
    graph = model.graph
    names = [n.name for n in graph.node]
    if len(set(names)) != len(names) or not all(names):
        raise GraphError(f"{name}: fp16 conversion needs unique node names; name the nodes (export does)")
    keep = keep_fp32(model) if callable(keep_fp32) else set(keep_fp32)
    unknown = keep - set(names)
    if unknown:
        raise GraphError(f"{name}: keep_fp32 names nodes that do not exist: {sorted(unknown)[:5]}")

    inferred = onnx.shape_inference.infer_shapes(model)
    float_tensors = {vi.name for vi in list(inferred.graph.value_info) + list(graph.input) + list(graph.output)
                     if vi.type.tensor_type.elem_type == TensorProto.FLOAT}
    initializers = {t.name: t for t in graph.initializer}
    float_tensors |= {n for n, t in initializers.items() if t.data_type == TensorProto.FLOAT}

    half_nodes = [n for n in graph.node if n.name not in keep]
    # A float initializer becomes fp16 when only fp16 nodes read it (at positions that may be fp16).
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, i in enumerate(node.input):
            readers.setdefault(i, []).append((node, k))

    def wants_half(node: onnx.NodeProto, index: int) -> bool:
        return node.name not in keep and index not in _FLOAT32_ONLY_INPUTS.get(node.op_type, set())

    precision: dict[str, int] = {i.name: TensorProto.FLOAT for i in graph.input}
    for init_name, init in initializers.items():
        if init.data_type == TensorProto.FLOAT and all(wants_half(n, k) for n, k in readers.get(init_name, [])):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init_name))
            precision[init_name] = TensorProto.FLOAT16
        elif init.data_type == TensorProto.FLOAT:
            precision[init_name] = TensorProto.FLOAT

    for node in half_nodes:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
    for node in graph.node:
        dtype = TensorProto.FLOAT if node.name in keep else TensorProto.FLOAT16
        for o in node.output:
            if o in float_tensors:
                precision[o] = dtype

    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def cast(tensor: str, to: int) -> str:
        key = (tensor, to)
        if key not in casts:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            casts[key] = f"{tensor}__{suffix}"
            new_nodes.append(helper.make_node("Cast", [tensor], [casts[key]], name=f"{tensor}__cast_{suffix}", to=to))
        return casts[key]

    for node in graph.node:
        for k, i in enumerate(node.input):
            if i not in precision:
                continue  # not a float tensor
            want = TensorProto.FLOAT16 if wants_half(node, k) else TensorProto.FLOAT
            if precision[i] != want:
                node.input[k] = cast(i, want)
        new_nodes.append(node)

    # Graph outputs stay float32: an fp16 producer writes a renamed tensor, cast back to the name.
    for out in graph.output:
        if precision.get(out.name) == TensorProto.FLOAT16:
            inner = f"{out.name}__fp16"
            for node in new_nodes:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], name=f"{out.name}__cast_fp32",
                                              to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(_topological(new_nodes, {i.name for i in graph.input} | set(initializers)))
    del graph.value_info[:]
    try:
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise GraphError(f"fp16 conversion of {name} produced an invalid graph: {exc}") from None
    return model


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Order `nodes` so every input is produced before it is read (Casts were appended late)."""
    ready, ordered, pending = set(available) | {""}, [], list(nodes)
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.input)]
        if not progress:
            raise GraphError("fp16 conversion: the graph has a cycle or reads an undefined tensor")
        for n in progress:
            ordered.append(n)
            ready.update(n.output)
        done = {id(n) for n in progress}
        pending = [n for n in pending if id(n) not in done]
    return ordered
