"""Compile tasks into compact ONNX graphs: one task (probabilities and logits out) or several tasks
on one backbone pass (one logits output per task).

The graph is composed of small named pieces: the backbone truncated after the deepest tap any task
uses, the pooling of each used tap (`PoolNormalize` without its normalisation), a `Gather` of the
selected features scaled by their tap's inverse L2 norm (`SelectedFeatures`), and the linear heads.
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

from .attach import GraphSummary, HeadSpec, split_by_tap
from .backbones import Backbone, TapSpec
from .errors import ExportError
from .export import DEFAULT_OPSET, INPUT_NAME, TappedBackbone, check_probe, export_module
from .pooling import NORM_EPS, tap_norm

OUTPUT_NAMES = ("probabilities", "logits")


@dataclass(frozen=True)
class TaskGraphSummary(GraphSummary):
    """What the compiler kept: taps used, segments kept, and parameter counts."""

    segments_kept: int = 0
    segments_total: int = 0


class LinearHead(nn.Module):
    """logits = x @ W + b; returns (softmax probabilities, logits)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(np.asarray(weight, dtype=np.float32)))
        self.register_buffer("bias", torch.as_tensor(np.asarray(bias, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = x @ self.weight + self.bias
        return torch.softmax(logits, dim=1), logits


class SelectedFeatures(nn.Module):
    """images float32[B, 3, H, W] -> float32[B, K]: the union of the features some heads read, each
    divided by its layer's L2 norm, in layout order.

    Each tap is pooled once and its norm taken once, over all its pooled features (that is what
    extraction normalised by), but only the K gathered features are scaled: the head sees exactly
    what it was fitted on without normalising every pooled feature.
    """

    def __init__(self, backbone: Backbone, layout: dict, features: np.ndarray):
        super().__init__()
        used, local = split_by_tap(layout, features)
        taps = [backbone.tap(name) for name in used]
        _check_layout_matches(backbone, layout, taps)
        self.taps: list[TapSpec] = taps
        self.tapped = TappedBackbone(backbone, taps, int(layout["target_size"]), layout.get("cls_token", "pool"),
                                     normalize=False)
        # One gather over the used taps' pooled features side by side (fewer, larger ops than one
        # gather per tap: at batch 1 each graph node costs about as much as the data it moves).
        sizes = [plan.features for plan in self.tapped.plans]
        starts = np.cumsum([0] + sizes[:-1])
        self.register_buffer("index", torch.as_tensor(np.concatenate([idx + s for idx, s in zip(local, starts)])))
        # Which tap each gathered feature comes from: expands the [B, taps] norms to [B, K].
        owner = np.concatenate([np.full(len(idx), i) for i, idx in enumerate(local)])
        self.register_buffer("owner", torch.as_tensor(owner, dtype=torch.int64))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.tapped(images)
        x = (torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0]).index_select(1, self.index)
        if len(pooled) == 1:
            return x / tap_norm(pooled[0])
        # Clamped once for all taps, as `tap_norm` clamps each.
        norms = torch.cat([torch.linalg.vector_norm(p, dim=1, keepdim=True) for p in pooled], dim=1)
        return x / norms.clamp_min(NORM_EPS).index_select(1, self.owner)


class TaskGraph(nn.Module):
    """images -> (probabilities, logits) for one task."""

    def __init__(self, backbone: Backbone, layout: dict, features: np.ndarray, weight: np.ndarray,
                 bias: np.ndarray):
        super().__init__()
        self.features = SelectedFeatures(backbone, layout, features)
        self.taps = self.features.taps
        self.head = LinearHead(weight, bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(images))


class MultiTaskGraph(nn.Module):
    """images -> one float32[B, C_t] logits tensor per head, from one pass of the backbone.

    The backbone runs up to the deepest tap any head reads; every tap is pooled and normalised once;
    each head then takes its own columns of the shared selected features.
    """

    def __init__(self, backbone: Backbone, layout: dict, heads: Sequence[HeadSpec]):
        super().__init__()
        union = np.unique(np.concatenate([np.asarray(h.features, dtype=np.int64) for h in heads]))
        self.features = SelectedFeatures(backbone, layout, union)
        self.taps = self.features.taps
        self.n = len(heads)
        # A head that reads every selected feature (one task alone) needs no gather of its columns.
        self.gathers = []
        for i, h in enumerate(heads):
            columns = np.searchsorted(union, np.asarray(h.features, dtype=np.int64))
            self.gathers.append(len(columns) != len(union))
            self.register_buffer(f"columns_{i}", torch.as_tensor(columns, dtype=torch.int64))
            self.register_buffer(f"weight_{i}", torch.as_tensor(np.asarray(h.weight, dtype=np.float32)))
            self.register_buffer(f"bias_{i}", torch.as_tensor(np.asarray(h.bias, dtype=np.float32)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.features(images)
        return tuple(
            (x.index_select(1, getattr(self, f"columns_{i}")) if gather else x) @ getattr(self, f"weight_{i}")
            + getattr(self, f"bias_{i}")
            for i, gather in enumerate(self.gathers)
        )


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
    """Build the per-task ONNX graph: images -> (probabilities, logits), both float32[B, C].

    features: int64[k] sorted indices into the layout's concatenated features;
    weight: float32[k, C]; bias: float32[C].
    """
    head = HeadSpec("task", np.asarray(features), np.asarray(weight, dtype=np.float32), np.asarray(bias))
    graph = TaskGraph(backbone, layout, head.features, head.weight, head.bias).eval()
    model = export_module(graph, backbone.input_size, OUTPUT_NAMES, opset)
    return model, _summary(backbone, graph.taps, [head])


def compile_multitask_graph(
    backbone: Backbone, layout: dict, heads: Sequence[HeadSpec], opset: int = DEFAULT_OPSET,
) -> tuple[onnx.ModelProto, TaskGraphSummary]:
    """Build one ONNX graph for several tasks on the same backbone export: images -> one output per
    head, named after it, holding its logits float32[B, C_h] (softmax them for probabilities).

    All heads must index the same `layout` (features from one exported backbone).
    """
    if not heads:
        raise ExportError("no task heads to compile")
    names = [h.name for h in heads]
    reserved = {INPUT_NAME, *OUTPUT_NAMES}
    bad = sorted({n for n in names if not n or n in reserved or names.count(n) > 1})
    if bad:
        raise ExportError(
            f"task names must be unique, non-empty and not one of {sorted(reserved)}; got {bad}: "
            "rename the tasks (the `task` field of task.json, set by `fit --task`)"
        )
    graph = MultiTaskGraph(backbone, layout, heads).eval()
    model = export_module(graph, backbone.input_size, names, opset)
    return model, _summary(backbone, graph.taps, heads)


def _summary(backbone: Backbone, taps: Sequence[TapSpec], heads: Sequence[HeadSpec]) -> TaskGraphSummary:
    kept = max(t.segment for t in taps) + 1
    return TaskGraphSummary(
        taps_used=[t.name for t in taps],
        segments_kept=kept,
        segments_total=len(backbone.segments),
        backbone_parameters_kept=backbone.segment_parameters(kept - 1),
        backbone_parameters_total=backbone.segment_parameters(),
        head_parameters=int(sum(np.size(h.weight) + np.size(h.bias) for h in heads)),
    )
