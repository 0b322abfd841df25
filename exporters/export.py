"""Export a backbone to ONNX with Head2Toe's taps as extra outputs, pooled and normalised in-graph.

The graph has one input, `images` float32[batch, 3, H, W] (dynamic batch), and one output per tap,
float32[batch, features_t], in tap order. The feature layout (which tap, its pooling, its offset in
the concatenated feature vector) travels with the graph as JSON in the ONNX metadata under
`h2t_edge.layout`, so extractors need no torch to read it.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import io
import json
import logging
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from .backbones import Backbone, TapSpec
from .errors import ExportError
from .pooling import CLS_TOKEN_POLICIES, PoolNormalize, plan_tap_pool

LAYOUT_KEY = "h2t_edge.layout"
LAYOUT_FORMAT = "h2t-edge/backbone-layout"
INPUT_NAME = "images"
DEFAULT_OPSET = 18


class TappedBackbone(nn.Module):
    """images float32[B, 3, H, W] -> tuple of float32[B, features_t], one per tap, in tap order.

    Runs the backbone only up to the segment of the deepest requested tap. cls_token: how token taps
    treat a class token ('pool', 'only', 'separate'; see `exporters.pooling`). normalize=False returns
    the pooled features before the per-tap unit normalisation (see `PoolNormalize`).
    """

    def __init__(self, backbone: Backbone, taps: Sequence[TapSpec], target_size: int, cls_token: str = "pool",
                 normalize: bool = True):
        super().__init__()
        if not taps:
            raise ExportError("no taps requested")
        _check_cls_token(backbone, cls_token)
        self.taps = list(taps)
        self.plans = [plan_tap_pool(t.kind, t.shape, target_size, cls_token) for t in self.taps]
        self.pools = nn.ModuleList(PoolNormalize(p, normalize) for p in self.plans)
        last = max(t.segment for t in self.taps)
        self.segments = nn.ModuleList(m for _, m in backbone.segments[: last + 1])
        # Plain list: these modules are already registered through `segments`.
        self._tapped_modules = [backbone.model.get_submodule(t.module) for t in self.taps]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled: list[torch.Tensor | None] = [None] * len(self.taps)

        def pool(i: int, value: torch.Tensor) -> None:
            pooled[i] = self.pools[i](value)

        with tap_hooks(self.taps, self._tapped_modules, pool):
            x = images
            for module in self.segments:
                x = module(x)
        return tuple(pooled)


@contextlib.contextmanager
def tap_hooks(taps: Sequence[TapSpec], modules: Sequence[nn.Module], on_value):
    """While open, a forward pass calls on_value(i, tensor) with tap i's tensor: its module's output,
    or its input for port 'input'. The call happens inside the hook, before any later in-place op
    can touch the tapped tensor."""
    handles = []
    for i, (tap, module) in enumerate(zip(taps, modules)):
        if tap.port == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args, i=i: on_value(i, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _i, output, i=i: on_value(i, output)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _check_cls_token(backbone: Backbone, cls_token: str) -> None:
    if cls_token not in CLS_TOKEN_POLICIES:
        raise ExportError(f"unknown class-token policy {cls_token!r}; use one of {', '.join(CLS_TOKEN_POLICIES)}")
    if cls_token != "pool" and not backbone.has_cls_token:
        raise ExportError(f"backbone {backbone.spec.name} has no class token; cls_token={cls_token!r} needs one")


def select_taps(backbone: Backbone, patterns: Sequence[str] | None = None) -> list[TapSpec]:
    """The taps named (all by default), in the backbone's order. Each entry is a tap name or an
    fnmatch pattern (`blocks.*.mlp.act`); one that matches nothing is an error listing close names."""
    if patterns is None:
        return list(backbone.taps)
    names = [t.name for t in backbone.taps]
    wanted: set[str] = set()
    for pattern in patterns:
        matched = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            raise ExportError(
                f"backbone {backbone.spec.name} has no tap matching {pattern!r}"
                + (f"; close names: {', '.join(close)}" if close else "")
                + f"; see `h2t-edge taps {backbone.spec.name}`"
            )
        wanted.update(matched)
    return [t for t in backbone.taps if t.name in wanted]


def feature_layout(backbone: Backbone, taps: Sequence[TapSpec], target_size: int, cls_token: str = "pool") -> dict:
    """The JSON layout of the concatenated features of `taps` at target size T."""
    entries, offset = [], 0
    for tap in taps:
        plan = plan_tap_pool(tap.kind, tap.shape, target_size, cls_token)
        entries.append({**tap.to_dict(), "output": tap.name, "pool": plan.to_dict(),
                        "features": plan.features, "offset": offset})
        offset += plan.features
    layout = {
        "format": LAYOUT_FORMAT,
        "version": 1,
        "backbone": backbone.spec.name,
        "timm_name": backbone.spec.timm_name,
        "weights": backbone.weights,
        "target_size": target_size,
        "cls_token": cls_token,
        "input": INPUT_NAME,
        "preprocess": backbone.preprocess,
        "pre_logits": backbone.spec.pre_logits,
        "total_features": offset,
        "taps": entries,
        "probe": backbone_probe(backbone),
    }
    # Plain JSON types (lists, not tuples), so a layout compares equal after a round trip.
    return json.loads(json.dumps(layout))


def backbone_probe(backbone: Backbone, values: int = 16) -> list[float]:
    """A fingerprint of the weights: the first logits of a seeded random image. The compiler checks
    it, so a task is never compiled onto weights other than those its features came from."""
    image = torch.randn(1, *backbone.input_size, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        out = backbone.run_segments(image)
    return [round(float(v), 6) for v in out.flatten()[:values]]


def check_probe(backbone: Backbone, layout: dict) -> None:
    """Raise unless `backbone` has the weights that produced `layout`."""
    expected = np.asarray(layout.get("probe", []), dtype=np.float64)
    got = np.asarray(backbone_probe(backbone, len(expected)), dtype=np.float64)
    if expected.size == 0 or not np.allclose(got, expected, atol=1e-3, rtol=1e-3):
        raise ExportError(
            f"backbone {backbone.spec.name} loaded with weights {backbone.weights!r} is not the one "
            f"the features were extracted with ({layout.get('weights')!r}); pass the same --weights"
        )


def export_module(
    module: nn.Module, input_size: Sequence[int], output_names: Sequence[str], opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """Export `module` (images -> outputs) with a dynamic batch axis through torch's dynamo exporter,
    which folds TF-style SAME padding into static Conv pads."""
    example = torch.zeros(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter reports progress on stdout and warns about things we do not control.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                module.eval(), (example,), dynamo=True, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(output_names),
                dynamic_shapes=({0: batch},), verbose=False,
            )
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    model = program.model_proto
    onnx.checker.check_model(model)
    return model


def export_backbone(
    backbone: Backbone, target_size: int = 512, tap_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET, cls_token: str = "pool",
) -> tuple[onnx.ModelProto, dict]:
    """Export the backbone with pooled, normalised taps as outputs; returns (model, layout).

    tap_names: tap names or fnmatch patterns (all taps by default); cls_token: 'pool', 'only' or
    'separate', how token taps treat the class token (recorded in the layout).
    """
    taps = select_taps(backbone, tap_names)
    module = TappedBackbone(backbone, taps, target_size, cls_token)
    model = export_module(module, backbone.input_size, [t.name for t in taps], opset)
    layout = feature_layout(backbone, taps, target_size, cls_token)
    set_metadata(model, LAYOUT_KEY, layout)
    return model, layout


def export_plain(backbone: Backbone, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The unmodified backbone, images -> logits, as the baseline for benchmarks."""
    return export_module(backbone.model, backbone.input_size, ["logits"], opset)


def set_metadata(model: onnx.ModelProto, key: str, value: dict) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = json.dumps(value)
            return
    model.metadata_props.add(key=key, value=json.dumps(value))
