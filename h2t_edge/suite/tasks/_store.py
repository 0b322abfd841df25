"""Cached image tasks on disk: one folder of PNG class subfolders per split, plus task.json.

Every task builder (generated or read from a source package) describes its images as
`SplitImages` (labels and a function that renders image i) and calls `build_image_task`. The
folder is reused when its task.json has the same parameters hash and all files are present;
otherwise it is built in a temporary folder beside the target and swapped in with `os.replace`,
so an interrupted build leaves either the old task or nothing, never a half-built folder with
a task.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from h2t_edge.core.datasets import ImageDataset
from h2t_edge.core.errors import DatasetError
from h2t_edge.core.progress import StageProgress
from runtime.io import atomic_write_json


@dataclass
class SplitImages:
    """The images of one split, rendered on demand.

    labels: int64[n] class index per image; render(i) -> uint8[H, W] (gray) or uint8[H, W, 3].
    """

    labels: np.ndarray
    render: Callable[[int], np.ndarray]
    record: dict = field(default_factory=dict)  # extra JSON for task.json["splits"][split]


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode("ascii")).hexdigest()


def class_names(prefix: str, n: int, start: int = 0) -> tuple[str, ...]:
    """`prefix00`.. zero-padded, so the sorted folder order is the class order."""
    width = max(2, len(str(start + n - 1)))
    return tuple(f"{prefix}{i:0{width}d}" for i in range(start, start + n))


def file_names(split_dir: Path, classes: tuple[str, ...], labels: np.ndarray) -> list[Path]:
    width = max(4, len(str(len(labels) - 1)))
    return [split_dir / classes[label] / f"{i:0{width}d}.png" for i, label in enumerate(labels.tolist())]


def build_image_task(
    out_dir: str | os.PathLike,
    generator: str,
    params: dict,
    classes: tuple[str, ...],
    splits: dict[str, SplitImages],
    progress: StageProgress | None = None,
    record: dict | None = None,
) -> dict[str, ImageDataset]:
    """Write (or reuse) `out_dir/<split>/<class>/<index>.png` and `out_dir/task.json`.

    Returns {split: ImageDataset}, each ordered by class, then index, as
    `datasets.from_folder(out_dir / split)` orders it. progress(done, total) after each image.
    """
    out_dir = Path(out_dir).resolve()
    digest = params_hash(params)
    files = {split: file_names(out_dir / split, classes, s.labels) for split, s in splits.items()}
    if not _is_complete(out_dir, digest, files):
        _check_replaceable(out_dir, generator)
        task = {"generator": generator, "params": params, "params_hash": digest, "classes": list(classes),
                "counts": {split: dict(zip(classes, np.bincount(s.labels, minlength=len(classes)).tolist()))
                           for split, s in splits.items()},
                **({"splits": {k: s.record for k, s in splits.items() if s.record}}
                   if any(s.record for s in splits.values()) else {}),
                **(record or {})}
        _build_and_swap(out_dir, task, splits, files, progress)
    return {split: _dataset(files[split], splits[split].labels, classes, out_dir / split) for split in splits}


def read_task_record(out_dir: str | os.PathLike) -> dict:
    return json.loads((Path(out_dir) / "task.json").read_text(encoding="utf-8"))


def _is_complete(out_dir: Path, digest: str, files: dict[str, list[Path]]) -> bool:
    try:
        task = read_task_record(out_dir)
    except (OSError, ValueError):
        return False
    if not isinstance(task, dict) or task.get("params_hash") != digest:
        return False
    return all(path.is_file() for paths in files.values() for path in paths)


def _check_replaceable(out_dir: Path, generator: str) -> None:
    """Refuse to replace a folder that is not a generated task: the swap would delete its contents."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DatasetError(f"task folder {out_dir} is a file; pass a new or empty folder")
    if not any(out_dir.iterdir()):
        return
    try:
        found = read_task_record(out_dir).get("generator")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != generator:
        raise DatasetError(
            f"task folder {out_dir} holds files but no {generator} task.json; "
            "pass a new or empty folder (it would be replaced)"
        )


def _build_and_swap(out_dir: Path, task: dict, splits: dict[str, SplitImages],
                    files: dict[str, list[Path]], progress: StageProgress | None) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final os.replace is a rename on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    old = None
    try:
        total, done = sum(len(paths) for paths in files.values()), 0
        for split, images in splits.items():
            for name in task["classes"]:
                (staging / split / name).mkdir(parents=True)
            for i, final in enumerate(files[split]):
                Image.fromarray(np.ascontiguousarray(images.render(i))).save(
                    staging / final.relative_to(out_dir), format="PNG")
                done += 1
                if progress is not None:
                    progress(done, total)
        # task.json is written last: its presence inside a task folder means the folder is complete.
        atomic_write_json(staging / "task.json", task)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _dataset(paths: list[Path], labels: np.ndarray, classes: tuple[str, ...], split_dir: Path) -> ImageDataset:
    order = np.lexsort((np.arange(len(labels)), labels))  # by class, then index, as from_folder lists them
    return ImageDataset(tuple(str(paths[i]) for i in order), labels[order], classes, str(split_dir))


def dataset_order(labels: np.ndarray) -> np.ndarray:
    """int64[n]: generation index of each row of the dataset `build_image_task` returns."""
    return np.lexsort((np.arange(len(labels)), np.asarray(labels)))
