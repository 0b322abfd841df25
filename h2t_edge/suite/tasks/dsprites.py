"""A dSprites-style generated task: one white shape on black, labelled by one binned factor.

The analogue of VTAB's dSpr-Loc (`factor="x"`: 16 bins of the shape's horizontal position) and
dSpr-Orient (`factor="orientation"`). Images are 64x64 8-bit grayscale PNGs. A shape (square,
ellipse or heart) has a random scale in [0.5, 1] of a maximum extent of 0.3 of the image, a
random rotation in [0, 2*pi) and a random position. The position is that of the shape's area
centroid (the centroid is also the centre of rotation), uniform over a fixed range that keeps
every shape, at every scale and rotation, inside the image; so the x label is what the centroid
of the white pixels shows.

Orientation labels use hearts only: a square looks the same after 90 degrees and an ellipse
after 180, so their angle cannot be read from the image; a heart has no rotational symmetry, so
each of its angle bins is visible.

Rendering is deterministic by seed: polygons are drawn on a 4x canvas and box-downsampled.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from h2t_edge.core.datasets import ImageDataset
from h2t_edge.core.progress import StageProgress
from h2t_edge.suite.tasks._store import SplitImages, build_image_task, class_names

GENERATOR = "dsprites"
GENERATOR_VERSION = 1  # bump when rendering changes, so cached tasks are rebuilt
IMAGE_SIZE = 64
MAX_EXTENT = 0.3  # the largest shape spans this fraction of the image
SCALE_RANGE = (0.5, 1.0)
SHAPES = ("square", "ellipse", "heart")
FACTORS = {"x": "x", "orientation": "rot"}  # factor -> class-name prefix
SPLITS = ("train", "test")
_SUPERSAMPLE = 4
_POLYGON_POINTS = 96
_MARGIN = 0.5  # pixels between the largest possible shape and the image border



def build_dsprites_task(
    out_dir: str | os.PathLike,
    factor: str = "x",
    n_train: int = 1000,
    n_test: int = 1000,
    bins: int = 16,
    seed: int = 0,
    progress: StageProgress | None = None,
) -> dict[str, ImageDataset]:
    """Generate (or reuse) a dSprites task under `out_dir`; returns {"train": ..., "test": ...}.

    Writes `out_dir/<split>/<class>/<index>.png` and `out_dir/task.json`. Classes are
    `x00`..`x15` (or `rot00`..), zero-padded so their sorted order is the bin order, and every
    bin is a class even if a small split has no example of it. Each dataset is ordered by class,
    then index, as `datasets.from_folder(out_dir / split)` orders it.

    A task whose task.json has the same parameters hash and whose files are all present is
    returned without writing anything. Otherwise the task is built in a temporary folder beside
    `out_dir` and swapped in with `os.replace`, so an interrupted build leaves either the old
    task or nothing, never a half-built folder with a task.json. Train and test come from
    independent random streams spawned from `seed`.

    progress: called as progress(done, total) after each image.
    """
    params = _check_params(factor, n_train, n_test, bins, seed)
    classes = class_names(FACTORS[factor], bins)
    splits = {split: sprite_images(_sample_factors(params, split)) for split in SPLITS}
    return build_image_task(out_dir, GENERATOR, params, classes, splits, progress, {"shapes": list(SHAPES)})


def sprite_split(factor: str, n: int, bins: int, seed: int, split: str) -> SplitImages:
    """`n` images of one split as `build_dsprites_task(..., seed=seed)` would draw them."""
    params = _check_params(factor, n, n, bins, seed)
    return sprite_images(_sample_factors(params, split))


def sprite_images(samples: dict[str, np.ndarray]) -> SplitImages:
    """The images of sampled latent factors (see `_sample_factors`), rendered on demand."""
    def render(i: int) -> np.ndarray:
        return render_sprite(SHAPES[samples["shape"][i]], samples["scale"][i], samples["angle"][i],
                             samples["x"][i], samples["y"][i])

    return SplitImages(samples["label"], render)


def render_sprite(shape: str, scale: float, angle: float, x: float, y: float) -> np.ndarray:
    """uint8[64, 64] image of one shape; `x`, `y` in [0, 1] place its centroid within the fixed range.

    scale: fraction of the maximum extent, in SCALE_RANGE; angle: radians, counter-clockwise.
    """
    outline = _OUTLINES[shape]
    cos, sin = np.cos(angle), np.sin(angle)
    # Image rows grow downwards, so a counter-clockwise turn negates the sine on y.
    rotated = outline @ np.array([[cos, -sin], [sin, cos]])
    radius = scale * _max_radius()
    low, high = _position_range()
    centre = np.array([low + x * (high - low), low + y * (high - low)])
    points = (rotated * radius + centre) * _SUPERSAMPLE
    canvas = Image.new("L", (IMAGE_SIZE * _SUPERSAMPLE,) * 2, 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(canvas.reduce(_SUPERSAMPLE))


def position_bin(x: np.ndarray | float, bins: int) -> np.ndarray:
    """int64 bin of a normalized position (or angle fraction) in [0, 1]."""
    return np.clip(np.floor(np.asarray(x, np.float64) * bins), 0, bins - 1).astype(np.int64)


def pixel_position(centroid_px: np.ndarray | float) -> np.ndarray:
    """Normalized position in [0, 1] of a pixel coordinate (pixel centres at i + 0.5)."""
    low, high = _position_range()
    return (np.asarray(centroid_px, np.float64) - low) / (high - low)


def _check_params(factor: str, n_train: int, n_test: int, bins: int, seed: int) -> dict:
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {', '.join(FACTORS)}, got {factor!r}")
    for name, value, least in (("n_train", n_train, 1), ("n_test", n_test, 1), ("bins", bins, 2), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "factor": factor,
        "n_train": int(n_train),
        "n_test": int(n_test),
        "bins": int(bins),
        "seed": int(seed),
        "image_size": IMAGE_SIZE,
    }


def _sample_factors(params: dict, split: str) -> dict[str, np.ndarray]:
    """Latent factors of every image of `split`: shape index, scale, angle, x, y (arrays of n), label."""
    # spawn() gives train and test independent streams; each one does not depend on the other's size.
    stream = np.random.SeedSequence(params["seed"]).spawn(len(SPLITS))[SPLITS.index(split)]
    rng = np.random.default_rng(stream)
    n = params[f"n_{split}"]
    shape = rng.integers(0, len(SHAPES), n)
    if params["factor"] == "orientation":
        shape[:] = SHAPES.index("heart")
    scale = rng.uniform(*SCALE_RANGE, n)
    angle = rng.uniform(0.0, 2 * np.pi, n)
    x, y = rng.uniform(0.0, 1.0, n), rng.uniform(0.0, 1.0, n)
    latent = x if params["factor"] == "x" else angle / (2 * np.pi)
    return {"shape": shape, "scale": scale, "angle": angle, "x": x, "y": y, "label": position_bin(latent, params["bins"])}


def _unit_outline(shape: str) -> np.ndarray:
    """float64[k, 2] polygon (x right, y down) with its area centroid at 0 and max vertex radius 1."""
    t = np.linspace(0.0, 2 * np.pi, _POLYGON_POINTS, endpoint=False)
    if shape == "square":
        points = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    elif shape == "ellipse":
        points = np.stack([np.cos(t), 0.5 * np.sin(t)], axis=1)
    elif shape == "heart":
        # The classic parametric heart; y is negated so the point is at the bottom of the image.
        hx = 16 * np.sin(t) ** 3
        hy = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        points = np.stack([hx, -hy], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    points = points - _area_centroid(points)
    return points / np.linalg.norm(points, axis=1).max()


def _area_centroid(points: np.ndarray) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)


_OUTLINES = {shape: _unit_outline(shape) for shape in SHAPES}


def _max_radius() -> float:
    """Pixels from centroid to the farthest vertex of a shape at scale 1."""
    return MAX_EXTENT * IMAGE_SIZE / 2


def _position_range() -> tuple[float, float]:
    """Pixel coordinates the centroid ranges over; any shape at any angle fits inside the image."""
    margin = _max_radius() * SCALE_RANGE[1] + _MARGIN
    return margin, IMAGE_SIZE - margin
