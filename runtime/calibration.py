"""Calibration images for INT8 engines: task images, preprocessed exactly as at inference.

Both the ONNX Runtime quantizer (exporters.quantize) and TensorRT's INT8 calibrator
(runtime.backends.tensorrt) read the batches made here, so calibration always sees what the
deployed graph will see.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np

from .errors import ImageError
from .preprocess import PreprocessConfig, list_images, load_image, preprocess_image


def calibration_batches(
    images: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    cfg: PreprocessConfig,
    batch_size: int = 8,
    limit: int | None = 64,
    seed: int = 0,
) -> list[np.ndarray]:
    """Preprocessed calibration batches, float32[b, 3, H, W] each (the last may be smaller).

    images: a folder (searched recursively, e.g. a class-per-subfolder dataset) or image paths.
    limit: use at most this many images, drawn evenly at random with `seed` so that every class
        folder is represented (None: all).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    paths = list_images(images) if isinstance(images, (str, os.PathLike)) else [Path(p) for p in images]
    if not paths:
        raise ImageError(f"no calibration images in {images}; pass a folder of task images (jpg/png...)")
    if limit is not None and len(paths) > limit:
        chosen = np.random.default_rng(seed).choice(len(paths), size=limit, replace=False)
        paths = [paths[i] for i in sorted(chosen)]
    arrays = [preprocess_image(load_image(p), cfg) for p in paths]
    return [np.stack(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
