"""Where Head2Toe reads a backbone: tap rules and segment rules, per model family and automatic.

A tap rule maps a built model to `[(tap name, module path)]` or `[(tap name, module path, port)]`
(port 'output', the default, or 'input'); a segment rule maps it to `[(segment name, module)]`
whose chained calls equal `model(x)`. `exporters.backbones` checks both when it loads a backbone.

The family rules follow the paper's Appendix I; `auto_taps` / `auto_segments` serve any other timm
model: every activation output and every block output, plus pre-logits and logits.
"""

from __future__ import annotations

import re

import torch
from torch import nn

Segment = tuple[str, nn.Module]
TapRule = list[tuple[str, ...]]


# --- EfficientNet / MobileNetV2 (timm's EfficientNet class) -------------------------------


def efficientnet_taps(model: nn.Module) -> TapRule:
    """Head2Toe granularity for EfficientNet and MobileNetV2: every activation inside every block
    (after the expansion and the depthwise convs; BatchNormAct2d applies the activation), each block
    output, the stem, the head conv, the pooled pre-logits and the logits."""
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


def efficientnet_segments(model: nn.Module) -> list[Segment]:
    segments: list[Segment] = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
    for s, stage in enumerate(model.blocks):
        segments += [(f"blocks.{s}.{i}", block) for i, block in enumerate(stage)]
    segments += [
        ("head", nn.Sequential(model.conv_head, model.bn2)),
        ("pre_logits", model.global_pool),
        ("logits", model.classifier),
    ]
    return segments


# --- ResNet (timm's ResNet, v1.5 bottlenecks) ---------------------------------------------


def resnet_taps(model: nn.Module) -> TapRule:
    """Appendix I of the paper, 52 taps for ResNet-50: the stem after its max-pool, the output of
    each of the three activations of every bottleneck, the final map before and after global
    pooling, and the logits. timm's ResNet is post-activation (v1.5), so the final map equals the
    last block's third activation; the paper's v2 has a norm + ReLU between them."""
    taps = [("stem", "maxpool")]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(model.get_submodule(layer)):
            taps += [(f"{layer}.{i}.{a}", f"{layer}.{i}.{a}") for a in ("act1", "act2", "act3") if hasattr(block, a)]
    # The last block's output (segments are blocks, so `layer4` itself never runs).
    taps += [("final_map", f"layer4.{len(model.layer4) - 1}"), ("pre_logits", "global_pool"), ("logits", "fc")]
    return taps


# --- Vision Transformer (timm's VisionTransformer) ----------------------------------------


class ViTEmbed(nn.Module):
    """Patch embedding + class token + position embedding (+ patch drop, pre-norm) as one segment:
    timm's `VisionTransformer.forward_features` up to the blocks."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.patch_embed, self.patch_drop, self.norm_pre = vit.patch_embed, vit.patch_drop, vit.norm_pre
        self.pos_drop = vit.pos_drop
        # Registered here too, so that the segment owns (and counts) the embedding parameters.
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(vit, name, None) is not None:
                self.register_parameter(name, getattr(vit, name))
        self._pos_embed = vit._pos_embed  # a bound method, not a submodule

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))


class ViTPreLogits(nn.Module):
    """Final norm + token pooling (+ fc_norm, head dropout): tokens [B, N, D] -> pre-logits [B, D]."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.norm, self.fc_norm, self.head_drop = vit.norm, vit.fc_norm, vit.head_drop
        if getattr(vit, "attn_pool", None) is not None:
            self.attn_pool = vit.attn_pool
        self._forward_head = vit.forward_head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward_head(self.norm(tokens), pre_logits=True)


def is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def vit_taps(model: nn.Module) -> TapRule:
    """The paper's ViT taps (Appendix I): the patch-embedded input (with class token and position
    embedding), then per encoder block the features after the first LayerNorm, after
    self-attention (before layer scale and the residual), after the MLP's GELU and after the MLP's
    second layer; then pre-logits (the pooled class token) and logits: 4 * depth + 3 taps."""
    taps = [("embed", "norm_pre")]
    for i in range(len(model.blocks)):
        taps += [(f"blocks.{i}.{m}", f"blocks.{i}.{m}") for m in ("norm1", "attn", "mlp.act", "mlp.fc2")]
    taps += [("pre_logits", "head_drop"), ("logits", "head")]
    return taps


def vit_segments(model: nn.Module) -> list[Segment]:
    segments: list[Segment] = [("embed", ViTEmbed(model))]
    segments += [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    segments += [("pre_logits", ViTPreLogits(model)), ("logits", model.head)]
    return segments


# --- any other timm model -----------------------------------------------------------------

# Activations whose outputs are taps. Gates (sigmoid, hard sigmoid) are left out: they scale
# features (squeeze-excite) rather than carry them.
_ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Mish, nn.PReLU,
)
_BLOCK_CONTAINERS = re.compile(r"^(blocks|layers|stages|layer\d+)$")


def _activation_types() -> tuple[type, ...]:
    from timm.layers import activations

    extra = [getattr(activations, n, None) for n in ("Swish", "Mish", "HardSwish", "HardMish", "GELU",
                                                     "GELUTanh", "QuickGELU", "PReLU")]
    return _ACTIVATIONS + tuple(t for t in extra if t is not None)


def _block_paths(model: nn.Module) -> list[str]:
    """Children of top-level block containers (`blocks`, `layers`, `stages`, `layerN`), one level
    deeper where a child is itself a Sequential (timm's EfficientNet nests blocks in stages)."""
    paths = []
    for name, container in model.named_children():
        if not _BLOCK_CONTAINERS.match(name) or not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        for child_name, child in container.named_children():
            if isinstance(child, nn.Sequential):
                paths += [f"{name}.{child_name}.{n}" for n, _ in child.named_children()]
            else:
                paths.append(f"{name}.{child_name}")
    return paths


def classifier_path(model: nn.Module) -> str:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for path, module in model.named_modules():
        if path and module is classifier:
            return path
    raise ValueError(f"{type(model).__name__} has no classifier module (get_classifier)")


def auto_taps(model: nn.Module) -> TapRule:
    """Taps of any timm model: every activation output (the norm layer's output where timm fuses
    the activation into it, as BatchNormAct2d), every block output, the classifier's input
    (pre-logits) and its output (logits). `load_backbone` orders them by forward call and drops
    those that do not run exactly once or that repeat an earlier tap's tensor."""
    activations = _activation_types()
    head = classifier_path(model)
    paths: list[str] = []
    blocks = set(_block_paths(model))
    for path, module in model.named_modules():
        if not path or path == head or path.startswith(head + "."):
            continue
        if isinstance(module, activations):
            parent_path = path.rpartition(".")[0]
            parent = model.get_submodule(parent_path) if parent_path else model
            # timm's norm-act layers apply the activation inside the norm: tap the norm layer.
            fused = parent_path and path.endswith(".act") and type(parent).__name__.endswith("Act2d")
            paths.append(parent_path if fused else path)
        elif path in blocks:
            paths.append(path)
    taps = [(p, p) for p in dict.fromkeys(paths)]
    return taps + [("pre_logits", head, "input"), ("logits", head)]


def auto_segments(model: nn.Module) -> list[Segment]:
    """Top-level children in registration order, with block containers split into blocks. The
    loader checks that they compose to the model and otherwise uses the whole model as one
    segment (no truncation)."""
    if is_vit(model):
        return vit_segments(model)
    blocks = _block_paths(model)
    segments: list[Segment] = []
    for name, child in model.named_children():
        inner = [p for p in blocks if p.startswith(name + ".")]
        if inner:
            segments += [(p, model.get_submodule(p)) for p in inner]
        else:
            segments.append((name, child))
    return segments
