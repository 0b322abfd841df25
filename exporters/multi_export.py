"""Export a backbone once with every tap pooled at several target sizes T (one pass for all T).

Head2Toe searches the target size T (paper Sec. 3.3: small, medium and large pools). One export per
T would run the backbone once per T over every image; `MultiTargetBackbone` runs it once and pools
each tapped tensor with the `PoolNormalize` of every T, so extraction costs one backbone pass
whatever the number of target sizes. Where two target sizes give a tap the same pooling (vectors,
global pools) the output is shared.

The graph has one input, `images` float32[batch, 3, H, W], and one output per distinct (tap,
pooling), named `<tap>@T<t>` after the smallest T that uses it. The ONNX metadata key
`h2t_edge.multi_layout` holds, per T, the exact layout that a single-T `export_backbone` writes
(`feature_layout`) and the output name each of its taps reads, so the features of one T are the
same numbers, in the same order, as those of a single-T export.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import onnx
import torch
from torch import nn

from .backbones import Backbone, TapSpec
from .errors import ExportError
from .export import (
    DEFAULT_OPSET, _check_cls_token, export_module, feature_layout, select_taps, set_metadata, tap_hooks,
)
from .pooling import PoolNormalize, TapPool, plan_tap_pool

MULTI_LAYOUT_KEY = "h2t_edge.multi_layout"
MULTI_LAYOUT_FORMAT = "h2t-edge/multi-target-layout"


def multi_output_name(tap: str, target_size: int) -> str:
    return f"{tap}@T{target_size}"


class MultiTargetBackbone(nn.Module):
    """images float32[B, 3, H, W] -> tuple of float32[B, features], one per distinct (tap, pooling).

    `output_names` lists the outputs in order; `output_of[(T, tap name)]` is the output that holds
    that tap's features at target size T.
    """

    def __init__(self, backbone: Backbone, taps: Sequence[TapSpec], target_sizes: Sequence[int],
                 cls_token: str = "pool"):
        super().__init__()
        if not taps:
            raise ExportError("no taps requested")
        sizes = sorted(set(int(t) for t in target_sizes))
        if not sizes or sizes[0] < 1:
            raise ExportError(f"target sizes must be positive integers, got {list(target_sizes)}")
        _check_cls_token(backbone, cls_token)
        self.taps, self.target_sizes = list(taps), sizes
        plans: list[TapPool] = []
        self.output_names: list[str] = []
        self.output_of: dict[tuple[int, str], str] = {}
        self._tap_outputs: list[list[int]] = []  # output indices fed by each tap
        for tap in self.taps:
            by_plan: dict[TapPool, int] = {}
            for t in sizes:
                plan = plan_tap_pool(tap.kind, tap.shape, t, cls_token)
                if plan not in by_plan:
                    by_plan[plan] = len(plans)
                    plans.append(plan)
                    self.output_names.append(multi_output_name(tap.name, t))
                self.output_of[(t, tap.name)] = self.output_names[by_plan[plan]]
            self._tap_outputs.append(list(by_plan.values()))
        self.pools = nn.ModuleList(PoolNormalize(p) for p in plans)
        last = max(t.segment for t in self.taps)
        self.segments = nn.ModuleList(m for _, m in backbone.segments[: last + 1])
        # Plain list: these modules are already registered through `segments`.
        self._tapped_modules = [backbone.model.get_submodule(t.module) for t in self.taps]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled: list[torch.Tensor | None] = [None] * len(self.pools)

        def pool_all(i: int, value: torch.Tensor) -> None:
            for j in self._tap_outputs[i]:  # every pooling of tap i reads the same tensor
                pooled[j] = self.pools[j](value)

        with tap_hooks(self.taps, self._tapped_modules, pool_all):
            x = images
            for module in self.segments:
                x = module(x)
        return tuple(pooled)


def multi_target_layout(backbone: Backbone, module: MultiTargetBackbone, cls_token: str = "pool") -> dict:
    """The JSON stored under `h2t_edge.multi_layout`: per T, the single-T layout and the output
    name of each of its taps (in the layout's tap order)."""
    layouts, outputs = {}, {}
    for t in module.target_sizes:
        layouts[str(t)] = feature_layout(backbone, module.taps, t, cls_token)
        outputs[str(t)] = [module.output_of[(t, tap.name)] for tap in module.taps]
    return json.loads(json.dumps({
        "format": MULTI_LAYOUT_FORMAT, "version": 1, "backbone": backbone.spec.name,
        "target_sizes": module.target_sizes, "layouts": layouts, "outputs": outputs,
    }))


def export_backbone_multi(
    backbone: Backbone, target_sizes: Sequence[int], tap_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET, cls_token: str = "pool",
) -> tuple[onnx.ModelProto, dict]:
    """Export the backbone with every tap pooled at each target size; returns (model, multi layout).

    tap_names: tap names or fnmatch patterns (all taps by default); cls_token as in
    `export_backbone`. The multi layout's `layouts[str(T)]` equals `export_backbone(backbone, T,
    tap_names, cls_token=cls_token)[1]`.
    """
    taps = select_taps(backbone, tap_names)
    module = MultiTargetBackbone(backbone, taps, target_sizes, cls_token)
    model = export_module(module, backbone.input_size, module.output_names, opset)
    layout = multi_target_layout(backbone, module, cls_token)
    set_metadata(model, MULTI_LAYOUT_KEY, layout)
    return model, layout
