"""The offline VTAB-1k-style task suite: a registry of task builders.

Every task follows VTAB-1k's protocol: 1,000 training examples per seed (an 800 train / 200
validation split is recorded in the train folder's task.json; hyperparameters are chosen by
5-fold CV on all 1,000), and a separate test set, fixed per task whatever the seed (at least
1,000 examples, or the whole remaining source where it is smaller).

A seed changes which training examples are drawn (natural tasks) or generated (structured
tasks). Images are cached as PNG class folders under `<data_dir>/<task>/train-seed<s>/` and
`<data_dir>/<task>/test/`, each with a task.json, and reused when their parameters match.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from h2t_edge.core.datasets import ImageDataset
from h2t_edge.core.errors import DatasetError
from h2t_edge.core.progress import StageProgress
from h2t_edge.suite.tasks import clevr3d, dsprites, natural, scenes
from h2t_edge.suite.tasks._store import SplitImages, build_image_task, class_names, dataset_order

GROUPS = ("natural", "structured")
N_TRAIN, N_VAL, N_TEST = 1000, 200, 1000
TEST_SEED = 1_000_003  # structured test sets: one fixed generation seed for every run seed
_GENERATOR = "h2t-edge-suite"
_VERSION = 1  # bump when any builder's images change, so cached tasks are rebuilt

# make(split, n, seed) -> (classes, images, params that identify the images)
Make = Callable[[str, int, int], tuple[tuple[str, ...], SplitImages, dict]]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    group: str  # 'natural' | 'structured'
    description: str
    source: str
    n_classes: int
    image: str  # stored image size and colour
    make: Make
    require: Callable[[], object] = lambda: None  # raises SourceMissingError when the source is absent
    default: bool = True  # part of the default suite (`h2t-edge eval` with no --task)
    max_test: int | None = None  # test rows the source has, when fewer than N_TEST

    def missing(self) -> str | None:
        """None when the source is installed, else the message that says how to install it."""
        try:
            self.require()
        except natural.SourceMissingError as exc:
            return str(exc)
        return None


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.group not in GROUPS:
        raise ValueError(f"task {spec.name}: group must be one of {GROUPS}, got {spec.group!r}")
    _REGISTRY[spec.name] = spec
    return spec


def list_tasks(include_optional: bool = True) -> list[TaskSpec]:
    return [s for s in _REGISTRY.values() if include_optional or s.default]


def get_task(name: str) -> TaskSpec:
    if name not in _REGISTRY:
        raise DatasetError(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)} (see `h2t-edge tasks`)")
    return _REGISTRY[name]


def default_data_dir() -> Path:
    return Path(os.environ.get("H2T_EDGE_DATA", Path.home() / ".cache" / "h2t-edge" / "tasks"))


@dataclass
class TaskData:
    """The two splits of one task and seed. validation: bool[len(train)] in dataset order."""

    spec: TaskSpec
    seed: int
    train: ImageDataset
    test: ImageDataset
    validation: np.ndarray


def build_task(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0, *,
               n_train: int = N_TRAIN, n_val: int = N_VAL, n_test: int = N_TEST,
               progress: StageProgress | None = None) -> TaskData:
    """Build (or reuse) the train folder of `seed` and the fixed test folder of task `name`."""
    spec = get_task(name)
    spec.require()
    if not 0 <= n_val < n_train:
        raise ValueError(f"n_val must lie in [0, n_train), got n_val={n_val}, n_train={n_train}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    test = _build_split(spec, root / name / "test", "test", n_test, TEST_SEED, progress)
    classes, images, params = spec.make("train", n_train, seed)
    val_rows = np.sort(np.random.default_rng([seed, n_train, 200]).choice(n_train, n_val, replace=False))
    images.record = {"validation": val_rows.tolist(),
                     "protocol": f"{n_train - n_val} train + {n_val} validation (VTAB-1k split)"}
    train = _build(spec, root / name / f"train-seed{seed}", "train", n_train, seed, classes, images, params, progress)
    validation = np.isin(dataset_order(images.labels), val_rows)
    return TaskData(spec, seed, train, test, validation)


def _build_split(spec: TaskSpec, out_dir: Path, split: str, n: int, seed: int, progress) -> ImageDataset:
    classes, images, params = spec.make(split, n, seed)
    return _build(spec, out_dir, split, n, seed, classes, images, params, progress)


def _build(spec, out_dir, split, n, seed, classes, images, params, progress) -> ImageDataset:
    params = {"task": spec.name, "version": _VERSION, "split": split, "n": n, "seed": seed, **params}
    record = {"group": spec.group, "source": spec.source, "description": spec.description}
    return build_image_task(out_dir, _GENERATOR, params, classes, {split: images}, progress, record)[split]


# ----------------------------------------------------------------------------- natural tasks


def _natural(load: Callable[[], natural.NaturalSource]) -> Make:
    cached = lru_cache(maxsize=1)(load)

    def make(split: str, n: int, seed: int):
        src = cached()
        if split == "test":
            # fixed rows: the same test set for every seed, the whole split where it is smaller
            rows = src.test[np.random.default_rng(TEST_SEED).permutation(len(src.test))[:n]]
        else:
            if n > len(src.train_pool):
                raise ValueError(f"n_train={n} exceeds the {len(src.train_pool)} training rows of the source")
            rows = np.random.default_rng([seed, 100]).choice(src.train_pool, n, replace=False)
        rows = np.asarray(rows, np.int64)
        images = SplitImages(src.labels[rows], lambda i: src.images[rows[i]])
        return src.classes, images, {"rows": _rows_digest(rows)}

    return make


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, np.int64).tobytes()).hexdigest()[:16]


register_task(TaskSpec(
    "fashion_mnist", "natural", "Fashion-MNIST clothing, 10 classes", "Debian dataset-fashion-mnist",
    10, "28x28 gray", _natural(natural.fashion_mnist), natural.require_fashion_mnist))
register_task(TaskSpec(
    "animal_mnist", "natural", "Animal-MNIST animal silhouettes, 10 classes", "PyPI animal-mnist",
    10, "28x28 gray", _natural(natural.animal_mnist), natural.require_animal_mnist))
register_task(TaskSpec(
    "digits", "natural", "scikit-learn handwritten digits, 10 classes", "scikit-learn load_digits",
    10, "8x8 gray", _natural(natural.sklearn_digits), natural.require_sklearn, max_test=797))


# ----------------------------------------------------------------------------- structured tasks


def _stream(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, ("train", "test").index(split)]))


def _dsprites(factor: str) -> Make:
    def make(split: str, n: int, seed: int):
        return (class_names(dsprites.FACTORS[factor], 16), dsprites.sprite_split(factor, n, 16, seed, split),
                {"generator": "dsprites", "generator_version": dsprites.GENERATOR_VERSION})
    return make


def _scenes(sample, label, prefix: str, n_classes: int, start: int = 0) -> Make:
    """sample(n, rng) -> scenes; the module that defines `sample` also renders its scenes."""
    module = {scenes.__name__: scenes, clevr3d.__name__: clevr3d}[sample.__module__]

    def make(split: str, n: int, seed: int):
        return (class_names(prefix, n_classes, start), module.scene_images(sample(n, _stream(seed, split)), label),
                {"generator": f"{module.__name__.rsplit('.', 1)[-1]}.{sample.__name__}"})
    return make


register_task(TaskSpec(
    "dspr_loc", "structured", "dSprites-style x position, 16 bins", "generated (numpy/Pillow)",
    16, "64x64 gray", _dsprites("x")))
register_task(TaskSpec(
    "dspr_orient", "structured", "dSprites-style orientation (hearts), 16 bins", "generated (numpy/Pillow)",
    16, "64x64 gray", _dsprites("orientation")))
register_task(TaskSpec(
    "count2d", "structured", "number of objects (3-10), several kinds, colours and sizes", "generated (numpy/Pillow)",
    8, "96x96 RGB", _scenes(scenes.count_scenes, scenes.count_label, "n", 8, start=scenes.COUNT_RANGE[0])))
register_task(TaskSpec(
    "distance2d", "structured", "distance from the viewer to the nearest object, 6 bins", "generated (numpy/Pillow)",
    scenes.DISTANCE_BINS, "96x96 RGB", _scenes(scenes.distance_scenes, scenes.distance_label, "d",
                                                scenes.DISTANCE_BINS)))


# ----------------------------------------------------------------------------- optional 3-D tasks

register_task(TaskSpec(
    "clevr3d_count", "structured", "POV-Ray CLEVR-style object count (3-10)", "Debian povray (rendered)",
    8, "96x96 RGB", _scenes(clevr3d.count_scenes, clevr3d.count_label, "n", 8, start=clevr3d.COUNT_RANGE[0]),
    clevr3d.require_povray, default=False))
register_task(TaskSpec(
    "clevr3d_distance", "structured", "POV-Ray CLEVR-style distance to the nearest object, 6 bins",
    "Debian povray (rendered)", clevr3d.DISTANCE_BINS, "96x96 RGB",
    _scenes(clevr3d.distance_scenes, clevr3d.distance_label, "d", clevr3d.DISTANCE_BINS),
    clevr3d.require_povray, default=False))
