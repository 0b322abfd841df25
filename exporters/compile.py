"""Compile one task into a compact ONNX graph: image in, class probabilities and logits out.

The graph is composed of small named pieces: the backbone truncated after the deepest tap the task
uses, `PoolNormalize` for each used tap, a `Gather` of the selected features and the linear head.
Inputs are plain data (a feature layout, selected indices, head weights); nothing here knows how
the head was fitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from .backbones import Backbone, TapSpec
from .errors import ExportError
from .export import DEFAULT_OPSET, TappedBackbone, check_probe, export_module

OUTPUT_NAMES = ("probabilities", "logits")


@dataclass(frozen=True)
class TaskGraphSummary:
    """What the compiler kept: taps used, segments kept, and parameter counts."""

    taps_used: list[str]
    segments_kept: int
    segments_total: int
    backbone_parameters_kept: int
    backbone_parameters_total: int
    head_parameters: int

    @property
    def backbone_fraction_dropped(self) -> float:
        return 1.0 - self.backbone_parameters_kept / max(1, self.backbone_parameters_total)


class GatherFeatures(nn.Module):
    """Concatenate the selected columns of each tap's features: [B, f_t] per tap -> [B, k]."""

    def __init__(self, local_indices: Sequence[np.ndarray]):
        super().__init__()
        self.n = len(local_indices)
        for i, idx in enumerate(local_indices):
            self.register_buffer(f"index_{i}", torch.as_tensor(np.asarray(idx, dtype=np.int64)))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = [f.index_select(1, getattr(self, f"index_{i}")) for i, f in enumerate(features)]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class LinearHead(nn.Module):
    """logits = x @ W + b; returns (softmax probabilities, logits)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(np.asarray(weight, dtype=np.float32)))
        self.register_buffer("bias", torch.as_tensor(np.asarray(bias, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = x @ self.weight + self.bias
        return torch.softmax(logits, dim=1), logits


class TaskGraph(nn.Module):
    """images -> (probabilities, logits) for one task."""

    def __init__(self, backbone: Backbone, layout: dict, features: np.ndarray, weight: np.ndarray,
                 bias: np.ndarray):
        super().__init__()
        used, local = split_by_tap(layout, features)
        taps = [backbone.tap(name) for name in used]
        _check_layout_matches(backbone, layout, taps)
        self.taps: list[TapSpec] = taps
        self.tapped = TappedBackbone(backbone, taps, int(layout["target_size"]), layout.get("cls_token", "pool"))
        self.gather = GatherFeatures(local)
        self.head = LinearHead(weight, bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.gather(self.tapped(images)))


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


def _check_layout_matches(backbone: Backbone, layout: dict, taps: Sequence[TapSpec]) -> None:
    if layout["backbone"] != backbone.spec.name:
        raise ExportError(
            f"the task was fitted on backbone {layout['backbone']!r}, not {backbone.spec.name!r}"
        )
    check_probe(backbone, layout)
    by_name = {t["name"]: t for t in layout["taps"]}
    for tap in taps:
        if tuple(by_name[tap.name]["shape"]) != tap.shape:
            raise ExportError(
                f"tap {tap.name} has shape {tap.shape} in this backbone but "
                f"{tuple(by_name[tap.name]['shape'])} in the task's layout: different backbone"
            )


def compile_task_graph(
    backbone: Backbone, layout: dict, features: np.ndarray, weight: np.ndarray, bias: np.ndarray,
    opset: int = DEFAULT_OPSET,
) -> tuple[onnx.ModelProto, TaskGraphSummary]:
    """Build the per-task ONNX graph.

    features: int64[k] sorted indices into the layout's concatenated features;
    weight: float32[k, C]; bias: float32[C].
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2 or weight.shape[0] != len(features) or np.shape(bias) != (weight.shape[1],):
        raise ExportError(
            f"head shapes do not agree: {len(features)} features, weight {weight.shape}, bias {np.shape(bias)}"
        )
    graph = TaskGraph(backbone, layout, features, weight, bias).eval()
    model = export_module(graph, backbone.input_size, OUTPUT_NAMES, opset)
    kept = max(t.segment for t in graph.taps) + 1
    summary = TaskGraphSummary(
        taps_used=[t.name for t in graph.taps],
        segments_kept=kept,
        segments_total=len(backbone.segments),
        backbone_parameters_kept=backbone.segment_parameters(kept - 1),
        backbone_parameters_total=backbone.segment_parameters(),
        head_parameters=int(weight.size + weight.shape[1]),
    )
    return model, summary
