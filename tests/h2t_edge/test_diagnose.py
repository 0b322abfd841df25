"""NC1 against a direct numpy reference, its behaviour on synthetic classes, and `diagnose` on a
tiny synthetic feature cache with a fitted task."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from h2t_edge.core.artifacts import TaskHead
from h2t_edge.research.diagnose import Diagnosis, diagnose, nc1, nc1_per_tap, prelogits_nc1, spearman, tap_nc1, write_diagnosis
from h2t_edge.core.errors import FitError
from h2t_edge.steps.extract import FeatureCache, write_cache
from runtime.preprocess import PreprocessConfig


def nc1_reference(h: np.ndarray, y: np.ndarray) -> float:
    """Eq. 4 written out: explicit sums over classes and samples, numpy's pinv of Sigma_B."""
    h = h.astype(np.float64)
    classes = sorted(set(y.tolist()))
    k, d = len(classes), h.shape[1]
    global_mean = h.sum(axis=0) / len(h)
    sigma_w, sigma_b = np.zeros((d, d)), np.zeros((d, d))
    for c in classes:
        rows = h[y == c]
        mean = rows.sum(axis=0) / len(rows)
        for row in rows:
            sigma_w += np.outer(row - mean, row - mean)
        sigma_b += np.outer(mean - global_mean, mean - global_mean)
    sigma_w /= len(h)
    sigma_b /= k
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b)) / k)


@pytest.mark.parametrize("n,d,k", [(60, 8, 5), (90, 3, 6), (40, 20, 4)])
def test_nc1_matches_numpy_reference(n, d, k):
    rng = np.random.default_rng(n + d + k)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present; sizes stay unbalanced
    h = rng.normal(size=(k, d))[y] * 2 + rng.normal(size=(n, d))
    assert nc1(h, y) == pytest.approx(nc1_reference(h, y), rel=1e-9)


def test_nc1_collapsed_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    k, d, n = 6, 32, 300
    y = np.repeat(np.arange(k), n // k)
    means = rng.normal(size=(k, d))
    assert nc1(means[y], y) == pytest.approx(0.0, abs=1e-12)
    values = [nc1(means[y] + s * rng.normal(size=(n, d)), y) for s in (0.01, 0.1, 0.5, 1.0, 3.0)]
    assert values[0] < 1e-3
    assert all(a < b for a, b in zip(values, values[1:])), values
    # invariant to a common scale and shift of the features, as a ratio of covariances must be
    h = means[y] + 0.5 * rng.normal(size=(n, d))
    assert nc1(3 * h + 7, y) == pytest.approx(nc1(h, y), rel=1e-9)


def test_nc1_rejects_bad_input():
    with pytest.raises(FitError, match="at least 2 classes"):
        nc1(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(FitError, match="NaN"):
        nc1(np.full((4, 2), np.nan), np.array([0, 0, 1, 1]))


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties averaged: ranks [0, 1.5, 1.5, 3] against [0, 1, 2, 3]
    a, b = np.array([0, 1.5, 1.5, 3]), np.arange(4.0)
    assert spearman([1, 2, 2, 5], [1, 2, 3, 4]) == pytest.approx(np.corrcoef(a, b)[0, 1])


def _synthetic_cache(root, noise=(0.05, 0.5, 2.0), d=6, k=4, n=80, seed=0, names=None) -> FeatureCache:
    """A complete feature cache on disk: one tap per noise level, classes spread by that noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n // k)
    taps, blocks, offset = [], [], 0
    names = names or [f"layer{i}" for i in range(len(noise) - 1)] + ["pre_logits"]
    for name, s in zip(names, noise):
        blocks.append(rng.normal(size=(k, d))[y] + s * rng.normal(size=(n, d)))
        taps.append({"name": name, "output": name, "features": d, "offset": offset, "shape": [d]})
        offset += d
    preprocess = PreprocessConfig((3, 8, 8), (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0).to_dict()
    layout = {"format": "h2t-edge/backbone-layout", "version": 1, "backbone": "synthetic", "weights": "random",
              "target_size": d, "input": "images", "preprocess": preprocess, "pre_logits": "pre_logits",
              "total_features": offset, "taps": taps}
    return write_cache(root, {
        "backbone": {"name": "synthetic", "weights": "random", "onnx_sha256": "0" * 64, "onnx": "synthetic.onnx"},
        "layout": layout, "dataset": {"source": "synthetic", "fingerprint": "0" * 64},
        "images": [f"{i}.png" for i in range(n)], "labels": y.tolist(), "classes": [f"c{i}" for i in range(k)],
        "dtype": "float32", "batch_size": n, "provider": "numpy",
    }, np.concatenate(blocks, axis=1))


def test_diagnose_per_tap_with_selection(tmp_path):
    cache = _synthetic_cache(tmp_path / "cache")
    # a "fitted" head that selects most from the least noisy tap: 5, 2, 1 features
    features = np.array([0, 1, 2, 3, 4, 6, 7, 12], dtype=np.int64)
    head = TaskHead("synthetic", "HEAD2TOE", list(cache.classes), features,
                    np.zeros((8, 4), np.float32), np.zeros(4, np.float32), cache.layout,
                    {"name": "synthetic", "weights": "random", "onnx_sha256": "0" * 64})
    head.save(tmp_path / "task")
    result = diagnose(cache, tmp_path / "task")
    x, y = cache.arrays()
    assert [t.name for t in result.taps] == ["layer0", "layer1", "pre_logits"]
    for i, tap in enumerate(result.taps):
        assert tap.nc1 == pytest.approx(nc1_reference(x[:, 6 * i:6 * (i + 1)], y), rel=1e-6)
    assert result.taps[0].nc1 < result.taps[1].nc1 < result.taps[2].nc1
    assert nc1_per_tap(x, y, cache.layout) == pytest.approx(tap_nc1(cache), rel=1e-12)
    assert [t.selected for t in result.taps] == [5, 2, 1]
    assert result.taps[0].selected_share == pytest.approx(5 / 8)
    assert result.taps[1].selected_fraction == pytest.approx(2 / 6)
    assert result.spearman_nc1_vs_share == pytest.approx(-1.0)
    assert prelogits_nc1(cache.root) == result.prelogits_nc1 == result.taps[2].nc1

    paths = write_diagnosis(result, tmp_path / "out" / "nc1")
    data = json.loads(paths["json"].read_text())
    assert data["format"] == "h2t-edge/nc1-diagnosis"
    assert [t["selected"] for t in data["taps"]] == [5, 2, 1]
    assert Diagnosis.from_dict(data) == result  # the JSON reads back as the same diagnosis
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_cli(tmp_path):
    from h2t_edge.cli import cli

    _synthetic_cache(tmp_path / "cache")
    result = CliRunner().invoke(cli, ["diagnose", str(tmp_path / "cache"), "-o", str(tmp_path / "d"), "-q"])
    assert result.exit_code == 0, result.output
    assert "pre_logits" in result.output
    assert (tmp_path / "d.json").exists() and (tmp_path / "d.png").exists()
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "h2t_edge.cli", "diagnose", str(tmp_path / "cache"), "--task",
                          str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "task.json" in bad.stderr


def test_finetune_layer_nc1_picks_the_most_collapsed_block(tmp_path):
    """`--layer nc1`: the tunable block whose output tap has the lowest NC1 (non-block taps ignored)."""
    from exporters.backbones import load_backbone
    from h2t_edge.research.finetune import choose_layer

    bb = load_backbone("efficientnet_lite0", weights="bundled", input_size=32)
    cache = _synthetic_cache(tmp_path / "cache", noise=(0.01, 1.0, 0.2, 3.0),
                             names=["stem", "blocks.3.0", "blocks.5.1", "pre_logits"])
    assert choose_layer(bb, "nc1", cache) == "blocks.5.1"
    assert choose_layer(bb, "middle") == "blocks.4.0" and choose_layer(bb, "blocks.2.1") == "blocks.2.1"
    with pytest.raises(FitError, match="feature cache"):
        choose_layer(bb, "nc1")
