"""A tiny exported "backbone" (onnx.helper) with a real h2t-edge feature layout, and tiny image
folders, so the reliability tests run extraction, fit, compile-free prediction and kills in seconds.

The graph maps images float32[b, 3, 16, 16] to two taps:
- "pool": AveragePool (kernel 16 / sqrt(T / 3)) over the image, flattened: T features;
- "pre_logits": a fixed 1x1 convolution (3 -> 8), ReLU, global average pool: 8 features.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from h2t_edge.selection import SearchGrid
from runtime.preprocess import PreprocessConfig

PREPROCESS = PreprocessConfig(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                              interpolation="bilinear", crop_pct=1.0)
TARGET_SIZES = (12, 48)  # 3 * (16 / kernel)^2 for kernels 8 and 4
PRE_LOGITS = 8
# A fit grid that fits the tiny task in about a second.
TINY_GRID = SearchGrid(lrs=(0.1,), steps=(30,), l21s=(1e-3,), fractions=(0.1, 0.5), folds=2, batch_size=8)


def tiny_layout(target_size: int) -> dict:
    taps = [{"name": "pool", "output": "pool", "offset": 0, "features": target_size},
            {"name": "pre_logits", "output": "pre_logits", "offset": target_size, "features": PRE_LOGITS}]
    return {"format": "h2t-edge/backbone-layout", "version": 1, "backbone": "tiny", "timm_name": "tiny",
            "weights": "test:tiny", "target_size": target_size, "cls_token": "pool", "input": "images",
            "preprocess": PREPROCESS.to_dict(), "pre_logits": "pre_logits",
            "total_features": target_size + PRE_LOGITS, "taps": taps, "probe": [0.0]}


def tiny_backbone(target_size: int = 48, layout: dict | str | None = None, first: str | None = None,
                  scale: float = 1.0) -> onnx.ModelProto:
    """The tiny graph with `layout` (default: the true one; a str is stored as it is) in its metadata.

    first: an elementwise op applied to the images before the "pool" tap (e.g. "Sqrt": NaN on
    negative normalized pixels); scale multiplies that tap (e.g. 1e6 overflows float16)."""
    if target_size not in TARGET_SIZES:
        raise ValueError(f"target_size must be one of {TARGET_SIZES}")
    kernel = int(16 / math.sqrt(target_size / 3))
    conv = np.random.default_rng(0).normal(size=(PRE_LOGITS, 3, 1, 1)).astype(np.float32)
    source = "images"
    nodes = []
    if first is not None:
        nodes.append(helper.make_node(first, ["images"], ["first"]))
        source = "first"
    nodes.append(helper.make_node("Mul", [source, "scale"], ["scaled"]))
    nodes += [
        helper.make_node("AveragePool", ["scaled"], ["pooled"], kernel_shape=[kernel, kernel], strides=[kernel, kernel]),
        helper.make_node("Flatten", ["pooled"], ["pool"], axis=1),
        helper.make_node("Conv", ["images", "conv_w"], ["mixed"]),
        helper.make_node("Relu", ["mixed"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["pre_logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_backbone",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["batch", target_size]),
         helper.make_tensor_value_info("pre_logits", TensorProto.FLOAT, ["batch", PRE_LOGITS])],
        initializer=[numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(np.float32(scale), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    layout = tiny_layout(target_size) if layout is None else layout
    entry = model.metadata_props.add()
    entry.key, entry.value = "h2t_edge.layout", layout if isinstance(layout, str) else json.dumps(layout)
    return model


def write_backbone(path: Path, target_size: int = 48, layout: dict | str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_backbone(target_size, layout, **options).SerializeToString())
    return path


def write_image_folder(root: Path, per_class: int = 6, classes=("dark", "red", "blue"), size=(20, 24),
                       seed: int = 0) -> Path:
    """Class subfolders of small PNGs whose colour depends on the class (a learnable task)."""
    rng = np.random.default_rng(seed)
    base = {"dark": (40, 40, 40), "red": (200, 40, 40), "blue": (40, 40, 200), "green": (40, 200, 40)}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-30, 30, (*size, 3))
            pixels = np.clip(np.asarray(base.get(c, (128, 128, 128))) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:03d}.png")
    return root
