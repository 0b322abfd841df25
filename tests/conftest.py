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


@pytest.fixture(scope="session")
def built_site(tmp_path_factory):
    """The documentation site built with `mkdocs build --strict`: (site folder, build log)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                          "-d", str(site)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return site, run.stdout + run.stderr
