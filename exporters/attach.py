"""Task graphs cut from the extraction graph itself: the graph a head was fitted on, plus its head.

`exporters.compile` builds a task graph from torch modules: right for fp32, where the export is a
pure function of the weights. A reduced-precision extraction graph (int8 QDQ, fp16) carries
choices the torch modules do not know: the calibrated scales and zero points, the fp32 region. So a
head fitted on such a graph's features is compiled by graph surgery on that same graph:

    extraction graph (every tap pooled and normalized at each T; `exporters.multi_export`)
    -> Gather the selected columns of each used tap's output -> Concat -> MatMul + Add (+ Softmax)
    -> keep only what the new outputs need (`onnx.utils.Extractor`: the taps no head reads and the
       backbone after the deepest used tap go)

The kept nodes are the extraction graph's own, so on the same images the task graph computes the
very features the head was fitted on, whatever the precision. No torch here: plain ONNX.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.utils import Extractor

from .errors import ExportError

MULTI_LAYOUT_KEY = "h2t_edge.multi_layout"  # exporters.multi_export (no torch import here)
OUTPUT_NAMES = ("probabilities", "logits")
_PREFIX = "h2t_head"


@dataclass(frozen=True)
class GraphSummary:
    """What a task-graph compiler kept of the backbone: taps used and parameter counts."""

    taps_used: list[str]
    backbone_parameters_kept: int
    backbone_parameters_total: int
    head_parameters: int

    @property
    def backbone_fraction_dropped(self) -> float:
        return 1.0 - self.backbone_parameters_kept / max(1, self.backbone_parameters_total)


@dataclass(frozen=True)
class CutSummary(GraphSummary):
    """What the cut kept of the extraction graph (parameters: initializer elements, any dtype)."""

    nodes_kept: int = 0
    nodes_total: int = 0


@dataclass(frozen=True)
class HeadSpec:
    """One task's head as plain data: `features` int64[k] sorted indices into the layout's
    concatenated features, `weight` float32[k, C], `bias` float32[C]; `name` names its output."""

    name: str
    features: np.ndarray
    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        weight = np.asarray(self.weight, dtype=np.float32)
        if weight.ndim != 2 or weight.shape[0] != len(self.features) or np.shape(self.bias) != (weight.shape[1],):
            raise ExportError(
                f"head {self.name!r} shapes do not agree: {len(self.features)} features, weight {weight.shape}, "
                f"bias {np.shape(self.bias)}"
            )


def _parameters(graph: onnx.GraphProto) -> int:
    return _parameters_of(graph.initializer)


def split_by_tap(layout: dict, features: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Split sorted global feature indices into (tap names, per-tap local indices), in tap order."""
    features = np.asarray(features, dtype=np.int64)
    if features.ndim != 1 or features.size == 0:
        raise ExportError("a task must select at least one feature (1-D index array)")
    if np.any(np.diff(features) <= 0):
        raise ExportError("selected feature indices must be sorted and unique")
    if features[0] < 0 or features[-1] >= layout["total_features"]:
        raise ExportError(
            f"selected feature index out of range [0, {layout['total_features']}) for this layout"
        )
    used, local = [], []
    for tap in layout["taps"]:
        lo, hi = tap["offset"], tap["offset"] + tap["features"]
        inside = features[(features >= lo) & (features < hi)]
        if inside.size:
            used.append(tap["name"])
            local.append(inside - lo)
    return used, local


def multi_layout_of(model: onnx.ModelProto) -> dict:
    meta = {p.key: p.value for p in model.metadata_props}
    if MULTI_LAYOUT_KEY not in meta:
        raise ExportError(f"the extraction graph has no {MULTI_LAYOUT_KEY} metadata: it is not an h2t-edge "
                          "multi-target-size export (`h2t-edge train` makes one)")
    return json.loads(meta[MULTI_LAYOUT_KEY])


def attach_heads(model: onnx.ModelProto, target_size: int, heads: Sequence,
                 single: bool = True) -> tuple[onnx.ModelProto, CutSummary]:
    """A task graph: `model` (an extraction graph, any precision) with the linear heads on its
    target size `target_size` features, every node the heads do not need removed.

    heads: `exporters.compile.HeadSpec`-like objects (name, features int64[k] sorted global indices
    into the layout of T, weight float32[k, C], bias float32[C]). single=True (one head): outputs
    `probabilities` and `logits`; else one logits output per head, named after it.
    """
    if single and len(heads) != 1:
        raise ExportError(f"a single-task graph takes one head, got {len(heads)}")
    multi = multi_layout_of(model)
    key = str(int(target_size))
    if key not in multi["layouts"]:
        raise ExportError(f"the extraction graph was exported for target sizes {multi['target_sizes']}, "
                          f"not {target_size}")
    layout, tap_outputs = multi["layouts"][key], multi["outputs"][key]
    output_of = {tap["name"]: out for tap, out in zip(layout["taps"], tap_outputs)}
    graph = model.graph
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}

    union = np.unique(np.concatenate([np.asarray(h.features, dtype=np.int64) for h in heads]))
    used, local = split_by_tap(layout, union)
    nodes, inits = [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, f"{_PREFIX}/{name}"))
        return inits[-1].name

    pieces = []
    for tap, idx in zip(used, local):
        source = output_of[tap]
        if source not in produced:
            raise ExportError(f"the extraction graph has no output {source!r} for tap {tap!r}")
        pieces.append(f"{_PREFIX}/{tap}/gathered")
        nodes.append(helper.make_node("Gather", [source, const(f"{tap}/index", idx)], [pieces[-1]],
                                      name=f"{_PREFIX}/{tap}/Gather", axis=1))
    selected = pieces[0]
    if len(pieces) > 1:
        selected = f"{_PREFIX}/selected"
        nodes.append(helper.make_node("Concat", pieces, [selected], name=f"{_PREFIX}/Concat", axis=1))

    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.HasField("dim_value") else "batch")
    outputs = []
    for i, h in enumerate(heads):
        cols = np.searchsorted(union, np.asarray(h.features, dtype=np.int64))
        x = selected
        if len(cols) != len(union):
            x = f"{_PREFIX}/{i}/selected"
            nodes.append(helper.make_node("Gather", [selected, const(f"{i}/columns", cols)], [x],
                                          name=f"{_PREFIX}/{i}/Gather", axis=1))
        logits = OUTPUT_NAMES[1] if single else h.name
        product = f"{_PREFIX}/{i}/product"
        nodes.append(helper.make_node("MatMul", [x, const(f"{i}/weight", np.asarray(h.weight, np.float32))],
                                      [product], name=f"{_PREFIX}/{i}/MatMul"))
        nodes.append(helper.make_node("Add", [product, const(f"{i}/bias", np.asarray(h.bias, np.float32))],
                                      [logits], name=f"{_PREFIX}/{i}/Add"))
        classes = int(np.shape(h.bias)[0])
        if single:
            nodes.append(helper.make_node("Softmax", [logits], [OUTPUT_NAMES[0]], name=f"{_PREFIX}/Softmax", axis=1))
            outputs.append(helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, [batch_dim, classes]))
        outputs.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, [batch_dim, classes]))

    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.node.extend(nodes)
    full.graph.initializer.extend(inits)
    del full.graph.output[:]
    full.graph.output.extend(outputs)
    # onnx's own subgraph extraction keeps what the new outputs need (as `steps.deploy` prunes)
    out = Extractor(full).extract_model([i.name for i in graph.input], [o.name for o in outputs])
    out.ir_version, out.producer_name = model.ir_version, model.producer_name
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.metadata_props.extend(p for p in model.metadata_props if p.key != MULTI_LAYOUT_KEY)
    g = out.graph
    head = _parameters_of(t for t in inits if t.name.endswith(("/weight", "/bias")))
    summary = CutSummary(used, _parameters(g) - _parameters_of(inits), _parameters(graph), head,
                         nodes_kept=len(g.node) - len(nodes), nodes_total=len(graph.node))
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the task graph cut from the extraction graph is not valid ONNX: {exc}") from None
    return out, summary


def _parameters_of(tensors) -> int:
    return sum(int(np.prod(t.dims)) for t in tensors)
