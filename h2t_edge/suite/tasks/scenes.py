"""2-D scenes of several objects, the flat analogues of VTAB's CLEVR tasks (numpy + Pillow only).

- Count (`clevr-count` analogue): 3 to 10 objects (circle, square, triangle; six colours; radius
  4 to 9 pixels) on a dark 96x96 background; the label is the number of objects minus 3. Objects
  never touch (at least `_GAP` pixels between their bounding circles), so each one is a separate
  connected component of non-background pixels.
- Distance (`clevr-closest-object-distance` analogue): 1 to 5 objects; the label is the distance
  from the viewer, the bottom-centre point of the image, to the nearest object's centre, in
  `DISTANCE_BINS` equal bins of [DISTANCE_RANGE]. The nearest distance is drawn uniformly from a
  uniformly drawn bin, so the classes are balanced; the other objects are farther away.

Objects are drawn without anti-aliasing, so every pixel is either background or one object's
colour; labels come from the placed objects, never from the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from h2t_edge.suite.tasks._store import SplitImages

IMAGE_SIZE = 96
BACKGROUND = (40, 40, 40)
COLOURS = ((230, 60, 50), (60, 180, 75), (70, 110, 230), (240, 200, 40), (200, 90, 220), (240, 240, 240))
KINDS = ("circle", "square", "triangle")
RADIUS_RANGE = (4.0, 9.0)
COUNT_RANGE = (3, 10)
DISTANCE_OBJECTS = (1, 5)
DISTANCE_BINS = 6
DISTANCE_RANGE = (12.0, 84.0)
VIEWER = (IMAGE_SIZE / 2, float(IMAGE_SIZE))  # (x, y) pixel coordinates of the viewer
_GAP = 3.0
_TRIES = 1000


@dataclass(frozen=True)
class SceneObject:
    kind: str
    colour: int  # index into COLOURS
    radius: float  # pixels, of the bounding circle
    x: float  # centre, pixels
    y: float


def render_scene(objects: list[SceneObject]) -> np.ndarray:
    """uint8[96, 96, 3] image of the objects on the background."""
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        colour = COLOURS[o.colour]
        if o.kind == "circle":
            draw.ellipse([o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius], fill=colour)
        elif o.kind == "square":
            h = o.radius / np.sqrt(2)
            draw.rectangle([o.x - h, o.y - h, o.x + h, o.y + h], fill=colour)
        else:
            angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
            draw.polygon([(o.x + o.radius * np.cos(a), o.y - o.radius * np.sin(a)) for a in angles], fill=colour)
    return np.asarray(canvas)


def count_scenes(n: int, rng: np.random.Generator) -> list[list[SceneObject]]:
    """n scenes whose object counts are uniform over COUNT_RANGE."""
    counts = rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1, n)
    return [_place(rng, int(k)) for k in counts]


def count_label(objects: list[SceneObject]) -> int:
    return len(objects) - COUNT_RANGE[0]


def distance_scenes(n: int, rng: np.random.Generator) -> list[list[SceneObject]]:
    """n scenes whose nearest-object distance bins are uniform over DISTANCE_BINS."""
    low, high = DISTANCE_RANGE
    width = (high - low) / DISTANCE_BINS
    scenes = []
    for target in rng.integers(0, DISTANCE_BINS, n):
        nearest = low + (target + rng.uniform(0.02, 0.98)) * width  # keeps clear of the bin edges
        count = int(rng.integers(DISTANCE_OBJECTS[0], DISTANCE_OBJECTS[1] + 1))
        scenes.append(_place(rng, count, nearest=nearest))
    return scenes


def viewer_distance(o: SceneObject) -> float:
    return float(np.hypot(o.x - VIEWER[0], o.y - VIEWER[1]))


def distance_label(objects: list[SceneObject]) -> int:
    """Bin of the distance from the viewer to the nearest object's centre."""
    nearest = min(viewer_distance(o) for o in objects)
    low, high = DISTANCE_RANGE
    return int(np.clip(np.floor((nearest - low) / (high - low) * DISTANCE_BINS), 0, DISTANCE_BINS - 1))


def scene_images(scenes: list[list[SceneObject]], label) -> SplitImages:
    labels = np.array([label(s) for s in scenes], dtype=np.int64)
    return SplitImages(labels, lambda i: render_scene(scenes[i]))


def _random_object(rng: np.random.Generator) -> SceneObject:
    return SceneObject(KINDS[rng.integers(len(KINDS))], int(rng.integers(len(COLOURS))),
                       float(rng.uniform(*RADIUS_RANGE)), 0.0, 0.0)


def _inside(x: float, y: float, r: float) -> bool:
    return r + 1 <= x <= IMAGE_SIZE - r - 1 and r + 1 <= y <= IMAGE_SIZE - r - 1


def _free(x: float, y: float, r: float, placed: list[SceneObject]) -> bool:
    return all(np.hypot(x - o.x, y - o.y) >= r + o.radius + _GAP for o in placed)


def _place(rng: np.random.Generator, count: int, nearest: float | None = None) -> list[SceneObject]:
    """`count` non-touching objects; with `nearest`, the first sits at that viewer distance and
    all others farther. Restarts the scene when a placement fails (rare at these densities)."""
    while True:
        placed: list[SceneObject] = []
        for i in range(count):
            shape = _random_object(rng)
            for _ in range(_TRIES):
                if nearest is not None and i == 0:
                    angle = rng.uniform(0.0, np.pi)
                    x, y = VIEWER[0] + nearest * np.cos(angle), VIEWER[1] - nearest * np.sin(angle)
                else:
                    x, y = rng.uniform(0, IMAGE_SIZE, 2)
                obj = SceneObject(shape.kind, shape.colour, shape.radius, float(x), float(y))
                if (_inside(x, y, shape.radius) and _free(x, y, shape.radius, placed)
                        and (nearest is None or i == 0 or viewer_distance(obj) > nearest + 1.0)):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) == count:
            return placed
