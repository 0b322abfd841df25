"""One-layer fine-tuning (Layer-FT, SCL-FT) as a torch model and as a compiled task graph.

The seed paper (neural-collapse-transfer, Sec. 3.3) fine-tunes one block of a pretrained backbone
plus a linear head, every other weight frozen:

- LAYER-FT: the head reads the penultimate features (pre-logits) computed through the tuned block;
- SCL-FT: a skip connection adds the tuned block's output, average-pooled to one value per channel
  and zero-padded to the pre-logits width, to the pre-logits (paper Appendix B.2, ResNet recipe;
  for token blocks the class token, or the token mean without one).

The head reads those features unit-normalised (the `PoolNormalize` of a vector tap), the same
features LINEAR and HEAD2TOE read in this project, so the methods differ only in what is tuned.

`FineTunedModel` splits the backbone at the tuned block: `prefix` (frozen segments before it, the
part whose activations training caches once), `tuned` (a copy of the block, trainable), then the
frozen segments up to the pre-logits tap. The backbone passed in is deep-copied and never changed.
`compile_finetuned_graph` exports images -> (probabilities, logits) with the tuned weights, through
the same `export_module` as `exporters.compile`. Nothing here knows how the weights were trained.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from .backbones import Backbone
from .compile import OUTPUT_NAMES, LinearHead
from .errors import ExportError
from .export import DEFAULT_OPSET, check_probe, export_module
from .pooling import PoolNormalize, plan_tap_pool

FT_METHODS = ("LAYER-FT", "SCL-FT")
LAYER_RULES = ("last-stage", "middle")
_BLOCK_NAME = re.compile(r"^(?P<stage>.+)\.(?P<index>\d+)$")


def tuning_units(backbone: Backbone) -> list[str]:
    """Segments that are blocks (`blocks.3.1`, `layer3.0`, `blocks.7`): the fine-tuning units."""
    return [name for name, module in backbone.segments
            if _BLOCK_NAME.match(name) and any(True for _ in module.parameters())]


def paper_layer(backbone: Backbone, rule: str = "last-stage") -> str:
    """The block the paper would tune, by `rule`:

    - 'last-stage': the first block of the last stage (paper footnote 9: Block 7 of ResNet18,
      Block 14 of ResNet50 "always yields the best or near-optimal results"; for a backbone with
      a single stage, as ViT, the second-to-last block: Layer 11 of 12);
    - 'middle': the stage-opening block nearest the middle of the block list (paper Table 3:
      Block 5 of ResNet18, Block 8 of ResNet50, i.e. the first block of layer3; for a single
      stage, block int(2n/3) - 1: Layer 8 of ViT-B's 12).
    Only first blocks of a stage are candidates ("only the first residual block of each channel
    dimension is fine-tuned", Appendix B.2). EfficientNet-Lite0: blocks.6.0 and blocks.4.0.
    """
    if rule not in LAYER_RULES:
        raise ExportError(f"unknown layer rule {rule!r}; use one of {', '.join(LAYER_RULES)} or a block name")
    units = tuning_units(backbone)
    if not units:
        raise ExportError(f"backbone {backbone.spec.name} has no block segments to fine-tune; name a segment")
    stages = list(dict.fromkeys(_BLOCK_NAME.match(u)["stage"] for u in units))
    if len(stages) == 1:
        return units[-2 if len(units) > 1 else 0] if rule == "last-stage" else units[max(0, 2 * len(units) // 3 - 1)]
    openings = [i for i, u in enumerate(units) if _BLOCK_NAME.match(u)["index"] == "0"]
    if rule == "last-stage":
        return units[openings[-1]]
    return units[min(openings, key=lambda i: (abs(i - len(units) / 2), i))]


def segment_index(backbone: Backbone, layer: str) -> int:
    names = [name for name, _ in backbone.segments]
    if layer not in names:
        raise ExportError(f"backbone {backbone.spec.name} has no segment {layer!r} to fine-tune; "
                          f"blocks: {', '.join(tuning_units(backbone))}")
    return names.index(layer)


class FineTunedModel(nn.Module):
    """images float32[B, 3, H, W] -> unit-normalised features float32[B, D_pre] through one tuned block.

    layer: the segment to tune; method: 'LAYER-FT' or 'SCL-FT'. `prefix(images)` is the frozen part
    before the tuned block; `from_prefix(activations)` the rest. Only `tuned` has trainable
    parameters (requires_grad); call `train()` to let its normalisation layers learn the
    downstream statistics (the paper's rule), the frozen parts stay in eval mode.
    """

    def __init__(self, backbone: Backbone, layer: str, method: str):
        super().__init__()
        if method not in FT_METHODS:
            raise ExportError(f"unknown fine-tuning method {method!r}; use one of {', '.join(FT_METHODS)}")
        index = segment_index(backbone, layer)
        pre = backbone.tap(backbone.spec.pre_logits)
        if index >= pre.segment:
            raise ExportError(f"segment {layer!r} is not before the pre-logits ({pre.name}); tune an earlier block")
        if not any(True for _ in backbone.segments[index][1].parameters()):
            raise ExportError(f"segment {layer!r} has no weights to fine-tune; choose a block")
        self.layer, self.method, self.index = layer, method, index
        model = copy.deepcopy(backbone.model).eval()
        segments = backbone.spec.segment_rule(model)
        if [n for n, _ in segments] != [n for n, _ in backbone.segments]:
            # a backbone that fell back to one whole-model segment cannot be split at a block
            raise ExportError(f"backbone {backbone.spec.name} cannot be split into segments; it cannot be fine-tuned")
        for p in model.parameters():
            p.requires_grad_(False)
        self.prefix = nn.Sequential(*(m for _, m in segments[:index]))
        self.tuned = segments[index][1]
        for p in self.tuned.parameters():
            p.requires_grad_(True)
        self.suffix = nn.ModuleList(m for _, m in segments[index + 1: pre.segment + 1])
        # Plain list: the module is already registered through `suffix`.
        self._pre_module = [model.get_submodule(pre.module)]
        self._pre_port = pre.port
        self.pre_logits_dim = int(np.prod(pre.shape))
        self.token_skip = "cls" if backbone.has_cls_token else "mean"
        self.normalize = PoolNormalize(plan_tap_pool("vector", (self.pre_logits_dim,), self.pre_logits_dim))

    def train(self, mode: bool = True) -> "FineTunedModel":
        super().train(False)
        self.tuned.train(mode)
        return self

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """The tuned block's parameters and buffers (normalisation statistics): what a task carries."""
        return {k: v.detach().clone() for k, v in self.tuned.state_dict().items()}

    def load_tuned_state(self, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        own = self.tuned.state_dict()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ExportError(f"tuned weights do not fit block {self.layer!r}: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
        for k, v in own.items():
            # size, not shape: stores may keep a scalar (num_batches_tracked) as shape (1,)
            if np.size(state[k]) != v.numel() or (np.ndim(state[k]) > 1 and tuple(np.shape(state[k])) != tuple(v.shape)):
                raise ExportError(f"tuned weight {k!r} of block {self.layer!r} has shape {tuple(np.shape(state[k]))}, "
                                  f"the backbone's is {tuple(v.shape)}")
        self.tuned.load_state_dict({k: torch.as_tensor(np.array(v).reshape(tuple(own[k].shape))).to(own[k].dtype)
                                    for k, v in state.items()})

    def from_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Activations at the tuned block's input -> unit-normalised features float32[B, D_pre]."""
        tuned = self.tuned(x)
        captured: list[torch.Tensor] = []
        if self._pre_port == "input":
            handle = self._pre_module[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        else:
            handle = self._pre_module[0].register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            h = tuned
            for module in self.suffix:
                h = module(h)
        finally:
            handle.remove()
        features = captured[0].flatten(1)
        if self.method == "SCL-FT":
            features = features + self._skip(tuned)
        return self.normalize(features)

    def _skip(self, tuned: torch.Tensor) -> torch.Tensor:
        """The tuned block's output, one value per channel, zero-padded to the pre-logits width."""
        if tuned.dim() == 4:
            pooled = tuned.mean(dim=(2, 3))
        elif tuned.dim() == 3:
            pooled = tuned[:, 0] if self.token_skip == "cls" else tuned.mean(dim=1)
        else:
            pooled = tuned.flatten(1)
        if pooled.shape[1] > self.pre_logits_dim:
            raise ExportError(f"SCL-FT: block {self.layer!r} has {pooled.shape[1]} channels, more than the "
                              f"{self.pre_logits_dim} pre-logits; tune a block with at most that many")
        return nn.functional.pad(pooled, (0, self.pre_logits_dim - pooled.shape[1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_prefix(self.prefix(images))


class FineTunedTaskGraph(nn.Module):
    """images -> (probabilities, logits): the fine-tuned features and a linear head."""

    def __init__(self, features: FineTunedModel, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.features = features
        self.head = LinearHead(weight, bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(images))


@dataclass(frozen=True)
class FineTunedSummary:
    """What a fine-tuned task adds on top of the frozen backbone, in parameters and fp32 bytes."""

    layer: str
    method: str
    tuned_parameters: int  # trainable weights of the tuned block
    tuned_buffers: int  # its normalisation statistics (also task-specific)
    head_parameters: int
    backbone_parameters: int  # the whole backbone, tuned block included

    @property
    def task_bytes(self) -> int:
        """Per-task storage beside a shared backbone: tuned block (weights + statistics) + head, fp32."""
        return 4 * (self.tuned_parameters + self.tuned_buffers + self.head_parameters)

    @property
    def tuned_fraction(self) -> float:
        return self.tuned_parameters / max(1, self.backbone_parameters)


def summarize(model: FineTunedModel, backbone: Backbone, weight: np.ndarray) -> FineTunedSummary:
    weight = np.asarray(weight)
    buffers = sum(b.numel() for n, b in model.tuned.named_buffers() if not n.endswith("num_batches_tracked"))
    return FineTunedSummary(model.layer, model.method, sum(p.numel() for p in model.tuned.parameters()), buffers,
                            int(weight.size + weight.shape[1]), backbone.segment_parameters())


def compile_finetuned_graph(
    backbone: Backbone, layer: str, method: str, tuned_state: Mapping[str, np.ndarray], weight: np.ndarray,
    bias: np.ndarray, probe: list[float] | None = None, opset: int = DEFAULT_OPSET,
) -> tuple[onnx.ModelProto, FineTunedSummary]:
    """Export a fine-tuned task: images float32[B, 3, H, W] -> (probabilities, logits) float32[B, C].

    tuned_state: the tuned block's state dict (numpy); weight: float32[D_pre, C]; bias: float32[C].
    probe: the backbone fingerprint recorded at training time (`exporters.export.backbone_probe`);
    when given, compiling onto other weights is an error.
    """
    if probe is not None:
        check_probe(backbone, {"probe": probe, "weights": backbone.weights})
    model = FineTunedModel(backbone, layer, method)
    model.load_tuned_state(tuned_state)
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2 or weight.shape[0] != model.pre_logits_dim or np.shape(bias) != (weight.shape[1],):
        raise ExportError(f"head shapes do not agree: {model.pre_logits_dim} features, weight {weight.shape}, "
                          f"bias {np.shape(bias)}")
    graph = FineTunedTaskGraph(model, weight, bias).eval()
    onnx_model = export_module(graph, backbone.input_size, OUTPUT_NAMES, opset)
    return onnx_model, summarize(model, backbone, weight)
