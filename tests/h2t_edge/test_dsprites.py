"""The generated dSprites task: labels match the pixels, builds are deterministic and cached atomically."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from h2t_edge.core.datasets import from_folder
from h2t_edge.core.errors import DatasetError
from h2t_edge.suite.tasks import build_dsprites_task
from h2t_edge.suite.tasks.dsprites import pixel_position, position_bin

_SMALL = dict(n_train=48, n_test=16, bins=16, seed=3)
_PIXEL_CENTRES = np.arange(64) + 0.5


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("dsprites") / "task"
    return out, build_dsprites_task(out, n_train=480, n_test=160, seed=7)


def _pixels(path: str) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "L" and image.size == (64, 64)
    return np.asarray(image, dtype=np.float64)


def _centroid_and_elongation(pixels: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted x centroid (pixels) and the ratio of the principal second moments."""
    weights = pixels / pixels.sum()
    ys, xs = np.meshgrid(_PIXEL_CENTRES, _PIXEL_CENTRES, indexing="ij")
    cx, cy = (weights * xs).sum(), (weights * ys).sum()
    cov = np.cov(np.stack([xs.ravel() - cx, ys.ravel() - cy]), aweights=weights.ravel(), bias=True)
    low, high = np.linalg.eigvalsh(cov)
    return cx, high / low


def _shape_of(elongation: float) -> str:
    # Measured on renders: square 1.0-1.12, heart 1.5-1.7, ellipse (axes 2:1) 3.6-4.0.
    return "square" if elongation < 1.3 else "heart" if elongation < 2.5 else "ellipse"


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_x_labels_are_the_bin_of_the_white_pixels_centroid(task):
    _, splits = task
    bins = 16
    bin_px = 1.0 / float(pixel_position(1.0) - pixel_position(0.0)) / bins
    exact, total = 0, 0
    for ds in splits.values():
        for path, label in zip(ds.paths, ds.labels.tolist()):
            cx, _ = _centroid_and_elongation(_pixels(path))
            position = float(pixel_position(cx))
            measured = int(position_bin(position, bins))
            total += 1
            if measured == label:
                exact += 1
                continue
            # A miss is allowed only one bin off, for a centroid within 0.3 px of a bin border.
            border_px = abs(position * bins - round(position * bins)) * bin_px
            assert abs(measured - label) == 1 and border_px < 0.3, (path, label, cx)
    assert exact / total >= 0.95


def test_all_shapes_appear_and_classes_are_roughly_balanced(task):
    out, splits = task
    train = splits["train"]
    assert train.classes == tuple(f"x{i:02d}" for i in range(16))
    shapes = [_shape_of(_centroid_and_elongation(_pixels(p))[1]) for p in train.paths[:90]]
    assert set(shapes) == {"square", "ellipse", "heart"}
    counts = train.class_counts()
    assert counts.min() >= 0.4 * counts.mean() and counts.max() <= 1.6 * counts.mean()
    record = json.loads((out / "task.json").read_text())
    assert record["counts"]["train"] == dict(zip(train.classes, counts.tolist()))
    assert record["params"]["n_test"] == 160 and len(splits["test"]) == 160
    # The folder loads back as the same dataset.
    assert from_folder(out / "train").fingerprint() == train.fingerprint()


def test_deterministic_by_seed_and_train_test_streams_differ(tmp_path):
    a = build_dsprites_task(tmp_path / "a", **_SMALL)
    b = build_dsprites_task(tmp_path / "b", **_SMALL)
    c = build_dsprites_task(tmp_path / "c", **{**_SMALL, "seed": 4})
    read = lambda ds: [Path(p).read_bytes() for p in ds.paths]  # noqa: E731
    assert read(a["train"]) == read(b["train"]) and read(a["test"]) == read(b["test"])
    assert a["train"].labels.tolist() == b["train"].labels.tolist()
    assert read(a["train"]) != read(c["train"])
    assert not set(read(a["train"])) & set(read(a["test"]))


def test_orientation_uses_hearts_only(tmp_path):
    splits = build_dsprites_task(tmp_path / "rot", factor="orientation", n_train=32, n_test=8)
    assert splits["train"].classes[0] == "rot00" and len(splits["train"].classes) == 16
    assert {_shape_of(_centroid_and_elongation(_pixels(p))[1]) for p in splits["train"].paths} == {"heart"}


def test_cache_reuse_writes_nothing_and_changed_params_rebuild(tmp_path):
    out = tmp_path / "task"
    first = build_dsprites_task(out, **_SMALL)
    before = _mtimes(out)
    calls = []
    again = build_dsprites_task(out, **_SMALL, progress=lambda done, total: calls.append(done))
    assert _mtimes(out) == before and calls == []
    assert again["train"] == first["train"]

    changed = build_dsprites_task(out, **{**_SMALL, "n_train": 20})
    assert len(changed["train"]) == 20 and json.loads((out / "task.json").read_text())["params"]["n_train"] == 20
    assert len(list((out / "train").rglob("*.png"))) == 20

    # A deleted image makes the cache incomplete: the task is rebuilt.
    victim = Path(changed["test"].paths[0])
    victim.unlink()
    build_dsprites_task(out, **{**_SMALL, "n_train": 20})
    assert victim.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["task"]  # no staging or old folders left


class _Interrupt(Exception):
    pass


def _interrupt_at(n):
    def progress(done, total):
        if done == n:
            raise _Interrupt

    return progress


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "task"
    with pytest.raises(_Interrupt):
        build_dsprites_task(out, **_SMALL, progress=_interrupt_at(30))
    assert not (out / "task.json").exists()
    assert list(tmp_path.iterdir()) == []

    build_dsprites_task(out, **_SMALL)
    old_hash = json.loads((out / "task.json").read_text())["params_hash"]
    # Interrupting a rebuild with new params keeps the old, complete task, under its own hash.
    with pytest.raises(_Interrupt):
        build_dsprites_task(out, **{**_SMALL, "seed": 9}, progress=_interrupt_at(10))
    assert json.loads((out / "task.json").read_text())["params_hash"] == old_hash
    assert [p.name for p in tmp_path.iterdir()] == ["task"]

    seen = []
    rebuilt = build_dsprites_task(out, **{**_SMALL, "seed": 9}, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (64, 64) and len(rebuilt["train"]) == 48
    assert json.loads((out / "task.json").read_text())["params"]["seed"] == 9


def test_refuses_to_replace_a_folder_that_is_not_a_task(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="no dsprites task.json"):
        build_dsprites_task(precious, **_SMALL)
    assert (precious / "keep.txt").read_text() == "mine"


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="factor"):
        build_dsprites_task(tmp_path / "t", factor="shape")
    with pytest.raises(ValueError, match="bins"):
        build_dsprites_task(tmp_path / "t", bins=1)
