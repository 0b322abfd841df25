"""Optional CLEVR-style 3-D tasks rendered with POV-Ray (Debian `povray`), cached like every task.

Spheres, cubes and cylinders of several colours and sizes stand on a grey floor, seen from
above and in front, lit by one key light with shadows:

- count (`clevr-count`): 3 to 10 objects, label = count - 3;
- distance (`clevr-closest-object-distance`): 1 to 5 objects, label = distance from the camera
  to the nearest object's centre in `DISTANCE_BINS` equal bins of `DISTANCE_RANGE` (scene units).

Objects never intersect (their footprints keep `_GAP` apart); as in CLEVR, one may partly hide
another. Rendering takes about 0.3 s per 96x96 image on one core, so these tasks are outside
the default suite.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from h2t_edge.suite.tasks._store import SplitImages
from h2t_edge.suite.tasks.natural import SourceMissingError

IMAGE_SIZE = 96
CAMERA = (0.0, 7.0, -8.0)
LOOK_AT = (0.0, 0.0, 2.0)
KINDS = ("sphere", "cube", "cylinder")
COLOURS = ((0.8, 0.15, 0.15), (0.15, 0.6, 0.2), (0.2, 0.3, 0.85), (0.9, 0.75, 0.1), (0.6, 0.2, 0.75), (0.85, 0.85, 0.85))
SIZES = (0.35, 0.55, 0.75)  # footprint radius
FLOOR = ((-4.0, 4.0), (-1.0, 6.0))  # x and z ranges of object centres
COUNT_RANGE = (3, 10)
DISTANCE_OBJECTS = (1, 5)
DISTANCE_BINS = 6
DISTANCE_RANGE = (9.4, 15.4)  # the nearest object's camera distance ranges over ~9.4..16
_GAP = 0.25


@dataclass(frozen=True)
class Solid:
    kind: str
    colour: int
    size: float
    x: float
    z: float
    turn: float  # degrees about the vertical axis


def require_povray() -> str:
    path = shutil.which("povray")
    if path is None:
        raise SourceMissingError("POV-Ray is not installed: install it with `sudo apt-get install povray` "
                                 "(needed only by the optional clevr3d_* tasks)")
    return path


def camera_distance(s: Solid) -> float:
    return float(np.linalg.norm(np.array([s.x, s.size, s.z]) - np.array(CAMERA)))


def distance_label(solids: list[Solid]) -> int:
    nearest = min(camera_distance(s) for s in solids)
    low, high = DISTANCE_RANGE
    return int(np.clip(np.floor((nearest - low) / (high - low) * DISTANCE_BINS), 0, DISTANCE_BINS - 1))


def count_label(solids: list[Solid]) -> int:
    return len(solids) - COUNT_RANGE[0]


def random_scene(rng: np.random.Generator, count: int) -> list[Solid]:
    """`count` solids with non-intersecting footprints (restarts on the rare failure)."""
    while True:
        placed: list[Solid] = []
        for _ in range(200 * count):
            size = float(SIZES[rng.integers(len(SIZES))])
            x, z = rng.uniform(*FLOOR[0]), rng.uniform(*FLOOR[1])
            if all(np.hypot(x - s.x, z - s.z) >= size + s.size + _GAP for s in placed):
                placed.append(Solid(KINDS[rng.integers(len(KINDS))], int(rng.integers(len(COLOURS))), size,
                                    float(x), float(z), float(rng.uniform(0, 90))))
                if len(placed) == count:
                    return placed


def count_scenes(n: int, rng: np.random.Generator) -> list[list[Solid]]:
    return [random_scene(rng, int(k)) for k in rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1, n)]


def distance_scenes(n: int, rng: np.random.Generator) -> list[list[Solid]]:
    """Scenes whose nearest-object bins are close to uniform (rejection on the drawn bin)."""
    scenes = []
    for target in rng.integers(0, DISTANCE_BINS, n):
        for _ in range(100_000):  # the rarest bin (farthest) takes ~25 draws on average
            scene = random_scene(rng, int(rng.integers(DISTANCE_OBJECTS[0], DISTANCE_OBJECTS[1] + 1)))
            if distance_label(scene) == target:
                scenes.append(scene)
                break
        else:
            raise RuntimeError(f"no scene with nearest-object bin {target}; check DISTANCE_RANGE")
    return scenes


def scene_source(solids: list[Solid]) -> str:
    """POV-Ray scene description of the solids."""
    v = lambda p: "<" + ", ".join(f"{c:.4f}" for c in p) + ">"  # noqa: E731
    lines = ["#version 3.7;", "global_settings { assumed_gamma 1.0 }",
             f"camera {{ location {v(CAMERA)} right x up y look_at {v(LOOK_AT)} angle 60 }}",
             "light_source { <-4, 10, -6> color rgb 1.2 }",
             "light_source { <5, 6, -2> color rgb 0.5 shadowless }",
             "plane { y, 0 pigment { color rgb 0.45 } finish { diffuse 0.8 } }"]
    for s in solids:
        paint = f"pigment {{ color rgb {v(COLOURS[s.colour])} }} finish {{ phong 0.4 }}"
        r = s.size
        if s.kind == "sphere":
            body = f"sphere {{ <0, {r:.4f}, 0>, {r:.4f}"
        elif s.kind == "cube":
            h = r / np.sqrt(2)
            body = f"box {{ <{-h:.4f}, 0, {-h:.4f}>, <{h:.4f}, {2 * h:.4f}, {h:.4f}>"
        else:
            body = f"cylinder {{ <0, 0, 0>, <0, {2 * r:.4f}, 0>, {r:.4f}"
        lines.append(f"{body} {paint} rotate y*{s.turn:.2f} translate <{s.x:.4f}, 0, {s.z:.4f}> }}")
    return "\n".join(lines) + "\n"


def render(solids: list[Solid]) -> np.ndarray:
    """uint8[96, 96, 3] POV-Ray rendering of the scene."""
    povray = require_povray()
    with tempfile.TemporaryDirectory(prefix="h2t-pov-") as tmp:
        scene, image = Path(tmp) / "scene.pov", Path(tmp) / "scene.png"
        scene.write_text(scene_source(solids))
        done = subprocess.run([povray, f"+I{scene}", f"+O{image}", f"+W{IMAGE_SIZE}", f"+H{IMAGE_SIZE}",
                               "+A0.3", "-D", "+FN", "-V", "-GA"], capture_output=True, text=True, cwd=tmp)
        if done.returncode != 0 or not image.is_file():
            raise RuntimeError(f"povray failed ({done.returncode}): {done.stderr[-500:]}")
        return np.asarray(Image.open(image).convert("RGB"))


def scene_images(scenes: list[list[Solid]], label) -> SplitImages:
    return SplitImages(np.array([label(s) for s in scenes], dtype=np.int64), lambda i: render(scenes[i]))
