"""Shared fixtures: the bundled backbone and its export are built once per test session."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def lite0():
    from exporters.backbones import load_backbone

    return load_backbone("efficientnet_lite0", weights="bundled")


@pytest.fixture(scope="session")
def lite0_onnx(lite0, tmp_path_factory):
    """(path, layout) of EfficientNet-Lite0 exported with all taps at T=512."""
    from exporters.export import export_backbone

    model, layout = export_backbone(lite0, target_size=512)
    path = tmp_path_factory.mktemp("backbone") / "lite0.onnx"
    path.write_bytes(model.SerializeToString())
    return path, layout


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Real photos from scikit-image saved as files: name -> path."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        path = root / f"{name}.png"
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(path)
        out[name] = path
    return out
