"""Torch-side exporters: backbones with Head2Toe taps, ONNX export, task-graph compiler."""
